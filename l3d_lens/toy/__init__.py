"""The paper's four toy models with known answers, seeded data and training, ground-truth
recovery metrics, and a sweep helper for k / rank / number of subnetworks.

    from l3d_lens import decompose
    from l3d_lens.toy import evaluate, load_toy, make_toy, paper_config, scorecard

    toy = make_toy("tms", seed=0)                       # trained model + data + ground truth
    toy.save("tms_0"); toy = load_toy("tms_0")          # safetensors + JSON: no retraining
    dec = decompose(toy.model, toy.l3d_data, paper_config("tms"))   # or recommended_config("tms")
    evaluate(toy, dec)                                  # error, |cos| per feature, dead, ...
    scorecard("tms", evaluate(toy, dec))                # the issue's targets, met or not (a table)

``demos/toy_models.py`` runs this for any of the four and prints the scorecard.

Modules: ``models`` (nn.Linear toy models), ``data`` (seeded sparse inputs), ``train``
(seeded training: ``make_toy``, and ``training_data``, the data it trains on), ``metrics``
(usable on any Decomposition with a known answer), ``reproduce`` (the paper's L3D settings and
per-toy scoring), ``sweep``, ``saving`` (``Toy.save``, ``load_toy``).
"""

from . import data, metrics, models, saving, sweep
from .models import SquareMLP, SuperpositionModel
from .reproduce import PAPER_SHAPES, TARGETS, Scorecard, evaluate, paper_config, recommended_config, scorecard
from .saving import load_toy
from .train import DEFAULT_EPOCHS, TOY_NAMES, Toy, fit, fit_tms, make_toy, training_data

__all__ = ["data", "metrics", "models", "saving", "sweep", "SquareMLP", "SuperpositionModel", "PAPER_SHAPES", "TARGETS",
           "Scorecard", "evaluate", "paper_config", "recommended_config", "scorecard", "load_toy",
           "DEFAULT_EPOCHS", "TOY_NAMES", "Toy", "fit", "fit_tms", "make_toy", "training_data"]

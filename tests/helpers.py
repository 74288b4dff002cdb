"""Test helpers: tiny models of every adapter kind available in this TransformerLens
generation (HookedTransformer exists in 2.x/3.x only; TransformerBridge in 3.x/4.x)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import zlib
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

torch.set_num_threads(1)

TL_VERSION = importlib.metadata.version("transformer-lens")

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: F401

    HAS_HOOKED = True
except ImportError:
    HAS_HOOKED = False

LM_KINDS = (["hooked"] if HAS_HOOKED else []) + ["bridge", "bridge_compat"]


def tiny_lm(kind: str, dtype=torch.float64, seed: int = 0, attn_only: bool = False, normalization: str = "LN",
            n_layers: int = 2, d_vocab: int = 20, n_ctx: int = 8, d_mlp: int = 32, gated: bool = False,
            n_key_value_heads: Optional[int] = None):
    """A 2-layer float64 LM with non-zero biases; ``gated``: a SiLU gated MLP (Llama-style);
    ``n_key_value_heads``: grouped-query attention."""
    common = dict(n_layers=n_layers, d_model=16, n_heads=2, d_head=8, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx,
                  act_fn="silu" if gated else "gelu", normalization_type=normalization, seed=seed,
                  attn_only=attn_only, gated_mlp=gated, n_key_value_heads=n_key_value_heads)
    if kind == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**common, dtype=dtype))
        with torch.no_grad():  # non-zero biases so their gradients are exercised
            for n, p in model.named_parameters():
                if ".b_" in n or n.endswith(".b"):
                    # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED)
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()) % 1000 + seed))
        return model.eval()
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**common), dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    if kind == "bridge_compat":
        model.enable_compatibility_mode()
    with torch.no_grad():  # the bridge installs some of its own hooks lazily on a first forward
        model(torch.zeros(1, 2, dtype=torch.long))
    return model.eval()


class TinyMLP(nn.Module):
    """A plain regression MLP, like the paper's toy models, plus one non-Linear parameter."""

    def __init__(self, d_in=5, d_hidden=4, d_out=5, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden).to(dtype)
        self.fc2 = nn.Linear(d_hidden, d_out).to(dtype)
        self.scale = nn.Parameter(torch.ones(d_out, dtype=dtype))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) * self.scale


def tokens(n=4, seq=6, d_vocab=20, seed=1):
    return torch.randint(0, d_vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


EOT = 256  # <|endoftext|> of the tiny byte-level GPT-2 vocabulary


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_gpt2(out: Path, model: bool = False) -> Path:
    """A byte-level GPT-2 tokenizer (ids = bytes, <|endoftext|> = 256, no merges) in ``out``, and
    with ``model`` a 2-layer GPT-2 (d_model 32, seeded): a Hugging Face model directory, offline."""
    from transformers import GPT2Tokenizer

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = EOT
    out.mkdir(exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    GPT2Tokenizer(str(out / "vocab.json"), str(out / "merges.txt")).save_pretrained(out)
    if model:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, n_ctx=64, vocab_size=257, bos_token_id=EOT,
                         eos_token_id=EOT)
        GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


def hf_bridge(folder: Path, model_cls, config):
    """A TransformerBridge of ``model_cls(config)`` (a Hugging Face causal LM, seeded with 0),
    saved with a 20-word tokenizer to ``folder`` and booted from there offline (skips where
    transformers or tokenizers are missing)."""
    import warnings

    import pytest

    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    hf = model_cls(config).eval()
    hf.config.save_pretrained(folder)
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(20)}, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="t0", pad_token="t1", eos_token="t2",
                                         bos_token="t3").save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(folder), hf_model=hf, dtype=torch.float32,
                                                   tokenizer=transformers.AutoTokenizer.from_pretrained(folder))


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: str, seconds: int = 120, backend: str = "gloo") -> Iterator[None]:
    """One rank's process group (``seconds`` timeout) around a block. A block that ends cleanly is
    followed by a final barrier (no rank tears gloo down while another still sends), the group's
    teardown, and an exit past the interpreter's teardown, where gloo's threads at times abort the
    process (SIGABRT, seen in CI). What the block raises reaches torch's spawn as usual."""
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def in_process_group(rank: int, world: int, init_file: str, out: str, body) -> None:
    """One gloo rank (20 s process-group timeout) running ``body()``: what it raises goes to
    ``out.<rank>`` ("ok" if nothing), then ``process_group``'s barrier, as a script that goes on
    after catching the error would reach."""
    with process_group(rank, world, init_file, seconds=20):
        try:
            body()
            result = "ok"
        except Exception as e:
            result = f"{type(e).__name__}: {e}"
        Path(f"{out}.{rank}").write_text(result)


def run_ranks(worker, tmp_path, case: str) -> list[str]:
    """What each of 2 gloo ranks running ``worker(rank, 2, init_file, out, case)`` wrote to
    ``out.<rank>``; a rank that wrote nothing (it hung, or died) fails the test."""
    import time
    from pathlib import Path

    import pytest
    import torch.multiprocessing as mp

    out = str(tmp_path / "out")
    ctx = mp.start_processes(worker, args=(2, str(tmp_path / "init"), out, case), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks of {case!r} did not finish within 90 s")
    except mp.ProcessRaisedException as e:
        pytest.fail(f"a rank of {case!r} crashed: {e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [Path(f"{out}.{rank}").read_text() for rank in (0, 1)]


def killed_at_step(monkeypatch, at: int) -> None:
    """Training stops with KeyboardInterrupt (as Ctrl-C would) when it reaches its step ``at``."""
    from l3d_lens import training

    real = training.step

    def step(task, f, opt, x, paired, gen, sums, i, epoch):
        if i == at:
            raise KeyboardInterrupt
        return real(task, f, opt, x, paired, gen, sums, i, epoch)

    monkeypatch.setattr(training, "step", step)


def as_earlier_save(folder) -> None:
    """``folder``'s factors file rewritten without the header entry that records its JSON's
    SHA-256, as an l3d_lens before that entry saved it: a test that edits the JSON to stand for
    an earlier save (or its files) then loads it as that save would load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from l3d_lens.io import META_SHA256

    file = str(Path(folder) / "factors.safetensors")
    with safe_open(file, "pt") as f:
        header = {k: v for k, v in (f.metadata() or {}).items() if k != META_SHA256}
    save_file(load_file(file), file, metadata=header)

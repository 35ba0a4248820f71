"""The public NextQuill code's training step, restated in PyTorch + transformers: the baseline of
benchmarks/step.py and the reference tests/train/test_public_step.py compares the JAX step with. Not part of
the package (torch is only a test dependency).

Written from the description in NEXTQUILL.md ("The public code's protocol", "Known defects"), not copied:

- the model is a `Qwen2ForCausalLM`; every example gives two sequences, prompt-with-history + target and
  prompt-without-history + target, both LEFT-padded to one length (the public code: 4,097 tokens), so the
  target tokens sit at the same positions in both and one label tensor serves both;
- two forward passes return full logits z_h, z_∅ [B, T, V]; two full softmaxes p_h, p_∅ [B, T, V] give the
  data-side effect of the label DCE = p_h[y] − p_∅[y] (dynamic: the model being trained, no gradient);
- weights ω = λ where DCE > δ else ε (δ 0.05, λ 0.9, ε 0.1);
  L = Σ ω·CE(z_h, y) / Σ ω + α · mean CE(z_h − z_∅, y) (α 0.1), normalised per micro-batch;
- backward through both passes; micro-batch losses divided by the accumulation count (the Trainer's mean of
  means); gradient clipping at global norm 1.0; AdamW (lr 5e-6, weight decay 0.025, not on biases and norms).

As in the Trainer, no `position_ids` are passed, so positions count from the first (padding) slot; RoPE sees
only differences of positions, so left padding leaves the outputs unchanged.

    python tests/reference/torch_public_step.py --model-dir DIR --examples FILE.npz --pad-len 4097 \
        --micro-batch 1

runs timed steps on the examples in FILE.npz (`prompt_with`, `prompt_without`, `target` as object arrays of
int arrays) and prints one JSON line; `benchmarks/step.py` drives it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def left_pad(
    prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + target per example, left-padded to `length`.

    Returns input_ids, attention_mask and labels, each [B, length] int64; labels hold the target ids at the
    target positions and IGNORE elsewhere (unshifted, as Hugging Face expects).

    Raises:
        ValueError: an example longer than `length`.
    """
    b = len(prompts)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        n = len(p) + len(t)
        if n > length:
            raise ValueError(f"example {i} has {n} tokens, more than the pad length {length}")
        ids[i, length - n :] = torch.as_tensor(np.concatenate([p, t]), dtype=torch.long)
        mask[i, length - n :] = 1
        labels[i, length - len(t) :] = torch.as_tensor(t, dtype=torch.long)
    return ids, mask, labels


def public_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    alpha: float = 0.1,
    threshold: float = 0.05,
    high: float = 0.9,
    low: float = 0.1,
) -> torch.Tensor:
    """The NextQuill loss of one micro-batch, the public code's way (full logits and softmaxes)."""
    z_h = model(input_ids=batch["with_ids"], attention_mask=batch["with_mask"]).logits[:, :-1]  # [B, T-1, V]
    z_o = model(input_ids=batch["without_ids"], attention_mask=batch["without_mask"]).logits[:, :-1]
    y = batch["labels"][:, 1:]  # [B, T-1]
    mask = y != IGNORE
    y_safe = y.clamp(min=0).unsqueeze(-1)
    p_h = torch.softmax(z_h, dim=-1)  # [B, T-1, V]
    p_o = torch.softmax(z_o, dim=-1)
    dce = (p_h.gather(-1, y_safe) - p_o.gather(-1, y_safe)).squeeze(-1).detach()  # [B, T-1]
    weights = torch.where(dce > threshold, high, low) * mask
    ce_h = F.cross_entropy(z_h.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
    loss_n = (weights.flatten() * ce_h).sum() / weights.sum()
    loss_p = F.cross_entropy((z_h - z_o).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    return loss_n + alpha * loss_p


def make_optimizer(
    model: torch.nn.Module, lr: float = 5e-6, weight_decay: float = 0.025
) -> torch.optim.AdamW:
    """AdamW with the Trainer's grouping: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Backward of every micro-batch's loss divided by their count, into the parameters' `.grad` (the
    Trainer's mean of micro-batch means); returns that mean loss."""
    total = 0.0
    for mb in micro_batches:
        loss = public_loss(model, mb) / len(micro_batches)
        loss.backward()
        total += float(loss.detach())
    return total


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict[str, torch.Tensor]]
) -> float:
    """One optimizer step over a global batch given as micro-batches; returns the mean micro-batch loss."""
    total = accumulate_gradients(model, micro_batches)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def micro_batches_of(
    examples: dict[str, np.ndarray], pad_len: int, micro_batch: int, pad_id: int
) -> list[dict]:
    """Cut the examples into micro-batches of `micro_batch` examples, each left-padded to `pad_len`."""
    n = len(examples["target"])
    if n % micro_batch:
        raise ValueError(f"{n} examples do not split into micro-batches of {micro_batch}")
    out = []
    for s in range(0, n, micro_batch):
        sl = slice(s, s + micro_batch)
        w_ids, w_mask, labels = left_pad(examples["prompt_with"][sl], examples["target"][sl], pad_len, pad_id)
        o_ids, o_mask, labels_o = left_pad(
            examples["prompt_without"][sl], examples["target"][sl], pad_len, pad_id
        )
        assert torch.equal(labels, labels_o)  # targets end both sequences, so they share positions
        out.append(
            {
                "with_ids": w_ids,
                "with_mask": w_mask,
                "without_ids": o_ids,
                "without_mask": o_mask,
                "labels": labels,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a Hugging Face Qwen2 directory")
    parser.add_argument("--examples", required=True, help=".npz with prompt_with, prompt_without, target")
    parser.add_argument("--pad-len", type=int, required=True, help="every sequence is left-padded to this")
    parser.add_argument("--micro-batch", type=int, default=1, help="examples per forward pass")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--imports-only", action="store_true", help="import, then exit (memory baseline)")
    args = parser.parse_args(argv)

    import transformers
    from transformers import Qwen2ForCausalLM

    if args.imports_only:
        return 0
    torch.manual_seed(0)
    model = Qwen2ForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    optimizer = make_optimizer(model)
    data = np.load(args.examples, allow_pickle=True)
    examples = {k: data[k] for k in ("prompt_with", "prompt_without", "target")}
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    micro = micro_batches_of(examples, args.pad_len, args.micro_batch, pad_id)
    real_tokens = int(sum(int(mb["with_mask"].sum() + mb["without_mask"].sum()) for mb in micro))
    first_loss = train_step(model, optimizer, micro)  # warm-up (also gives the loss of the initial weights)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, micro)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "side": "torch",
                "first_loss": first_loss,
                "step_s": times,
                "real_tokens": real_tokens,
                "slots": int(sum(mb["with_ids"].numel() + mb["without_ids"].numel() for mb in micro)),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

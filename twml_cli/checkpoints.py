"""A training loop's whole state as safetensors plus JSON, never pickle: weights, optimizer
(momentum buffers), learning-rate schedule position, the shuffling stream, every process's
RNG and perturbation state. Saved every few passes; an interrupted run resumes from it bit
for bit (the perturbations and augmentation draw keyed randomness, so nothing else is needed).

The two files are one checkpoint: both carry the same random token, and `load` refuses a pair
whose tokens differ (a process killed between writing or uploading the two), since weights of
one pass with the position of another would not resume bit for bit.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed


@dataclass
class TrainState:
    """Everything the loop needs to continue after pass `passes_done`: weights, optimizer,
    schedule position, the shuffling stream, every process's RNG and perturbation state."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    WEIGHTS, META = "state.safetensors", "state.json"

    def save(self, folder: str | Path) -> Path:
        """Both files, each written whole (a new name, then renamed over the old one)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        weights, meta = folder / (self.WEIGHTS + ".new"), folder / (self.META + ".new")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(weights), metadata={"twml_token": token})
        meta.write_text(json.dumps({**self.meta, "token": token}, indent=1))
        os.replace(weights, folder / self.WEIGHTS)
        os.replace(meta, folder / self.META)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TrainState:
        """Reads safetensors and JSON only (never pickle). ValueError when the two files are not
        one checkpoint, or cannot be read."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / cls.META).read_text())
            with safe_open(str(folder / cls.WEIGHTS), framework="pt") as f:
                token = (f.metadata() or {}).get("twml_token")
            tensors = load_file(str(folder / cls.WEIGHTS))
        except Exception as err:  # noqa: BLE001 - a truncated or missing file, bad JSON: not a checkpoint
            raise ValueError(f"{folder} holds no whole checkpoint ({type(err).__name__})") from None
        if meta.get("token") != token:
            raise ValueError(f"{folder}: the weights and state.json come from two different checkpoints")
        return cls(tensors, {k: v for k, v in meta.items() if k != "token"})


def snapshot(
    model, optimizer, scheduler, shuffle, perturbation, step: int, passes_done: int, seconds: float, extra: dict
) -> TrainState:
    """The loop's state after `passes_done` passes, every process's share gathered (call on
    every rank); `extra` is kept in the JSON as it is."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    tensors["shuffle"] = shuffle.get_state()
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    for name, t in [*(("rng.cpu", rng[0]),), *((("rng.cuda", rng[1]),) if len(rng) > 1 else ())]:
        tensors[name] = _gather_per_rank(t)
    for k, v in perturbation.state().items():
        tensors[f"perturbation.{k}"] = _gather_per_rank(v)
    meta = {
        "step": step,
        "passes_done": passes_done,
        "train_time_s": seconds,
        "world_size": distributed.world_size(),
        "optimizer": {
            "param_groups": opt["param_groups"],
            "scalars": {
                str(i): {k: float(v) for k, v in s.items() if not (torch.is_tensor(v) and v.dim() > 0)}
                for i, s in opt["state"].items()
            },
        },
        "scheduler": scheduler.state_dict(),
        **extra,
    }
    return TrainState(tensors, json.loads(json.dumps(meta, default=float)))


def _gather_per_rank(t: torch.Tensor) -> torch.Tensor:
    """(world, *t.shape): each process's tensor, in rank order (through the GPU under NCCL)."""
    return distributed.all_gather_rows(t.detach()[None].to(distributed.collective_device())).cpu()


def restore(state: TrainState, model, optimizer, scheduler, shuffle, perturbation) -> tuple[int, int, float, dict]:
    """Load a snapshot into the loop's objects; (step, passes done, seconds spent, meta)."""
    meta, tensors = state.meta, state.tensors
    world, rank = distributed.world_size(), distributed.rank()
    if meta["world_size"] != world:
        raise ValueError(
            f"the checkpoint was made by {meta['world_size']} processes; resume it with as many (now {world})"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    opt = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for i, scalars in meta["optimizer"]["scalars"].items():
        opt["state"][int(i)] = {k: torch.tensor(v) for k, v in scalars.items()}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            opt["state"].setdefault(int(i), {})[name] = v.to(device)
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict({k: v for k, v in meta["scheduler"].items()})
    shuffle.set_state(tensors["shuffle"].to(shuffle.get_state().device))
    torch.set_rng_state(tensors["rng.cpu"][rank])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"][rank])
    perturbation.load_state(
        {
            k.removeprefix("perturbation."): v[rank].to(device)
            for k, v in tensors.items()
            if k.startswith("perturbation.")
        }
    )
    return meta["step"], meta["passes_done"], meta["train_time_s"], meta

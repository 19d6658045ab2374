"""The runner shared by the experiments: batching, sharding over ``torch.distributed`` ranks, resumable chunks.

The selected samples (positions ``0..n-1``) are cut into fixed chunks ``[start, stop)`` of ``batch_size``
samples. A chunk is one batch: ``process(x, labels, positions) -> {name: tensor (..., b)}`` (per-sample
results, the sample axis last), computed on the input's device. Chunks do not depend on the number of
processes, so every chunk is computed on exactly the same batch whatever the world size:

* sharding: rank ``r`` of ``W`` takes chunks ``r, r + W, r + 2W, ...`` (disjoint);
* resuming: each finished chunk is written atomically to ``DIR/chunks/START-STOP.pt`` (rank-free names);
  a restarted run skips the chunks already there. ``DIR/chunks/manifest.json`` holds the hash of the
  run's configuration; a run with a different configuration refuses to resume (or starts afresh with
  ``fresh=True``);
* gathering: every rank sends its chunks' results to rank 0 (``gather_object``), which concatenates all
  chunks in sample order: exactly the single-process result.

``torch.distributed`` is initialised only when the ``WORLD_SIZE`` environment variable is > 1 (torchrun);
the backend is ``nccl`` for CUDA devices and ``gloo`` otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backprop_hooks.errors import ResumeError
from backprop_hooks.files import atomic_write

Results = Dict[str, torch.Tensor]  # per-sample results of a chunk: the sample axis is the last one
Process = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Results]
Range = Tuple[int, int]


def config_hash(config: Dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys): the identity of a run."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def chunk_ranges(n: int, size: int) -> List[Range]:
    """``[(0, size), (size, 2 size), ..., (.., n)]``: the chunks of ``n`` samples (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# ---- processes ---------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place among ``world`` processes (``rank`` 0 is the one that writes reports)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` on rank 0 (in rank order); ``None`` on the other ranks."""
        if not self.distributed:
            return [obj]
        out: Optional[List[Any]] = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_processes(device: torch.device) -> Processes:
    """Join the process group when ``WORLD_SIZE`` > 1 (torchrun sets it, with RANK and MASTER_ADDR/PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    dist = torch.distributed
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Processes(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ---- the chunk store ---------------------------------------------------------------------------------


class ChunkStore:
    """Per-chunk results in ``folder/START-STOP.pt``, tied to one configuration by ``manifest.json``."""

    def __init__(self, folder: Path, config: Dict[str, Any]):
        self.folder = Path(folder)
        self.config = config
        self.hash = config_hash(config)

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"

    def open(self, fresh: bool = False) -> None:
        """Start (or, with ``fresh``, restart) the store; refuse chunks of another configuration."""
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        if self.manifest.is_file():
            stored = json.loads(self.manifest.read_text())
            if stored.get("config_hash") != self.hash:
                changed = sorted(
                    k
                    for k in set(stored.get("config", {})) | set(self.config)
                    if stored.get("config", {}).get(k) != self.config.get(k)
                )
                raise ResumeError(
                    f"{self.folder} holds chunks of a run with another configuration (differs in: "
                    f"{', '.join(changed) or 'unknown'}); rerun with the same arguments to resume, "
                    "--fresh to start over, or another --out"
                )
            return
        text = json.dumps({"config_hash": self.hash, "config": self.config}, indent=2, default=str) + "\n"
        atomic_write(self.manifest, lambda tmp: tmp.write_text(text))

    def path(self, chunk: Range) -> Path:
        return self.folder / f"{chunk[0]:08d}-{chunk[1]:08d}.pt"

    def has(self, chunk: Range) -> bool:
        return self.path(chunk).is_file()

    def save(self, chunk: Range, results: Results) -> None:
        cpu = {k: v.detach().cpu() for k, v in results.items()}
        atomic_write(self.path(chunk), lambda tmp: torch.save(cpu, tmp))

    def load(self, chunk: Range) -> Results:
        return torch.load(self.path(chunk), map_location="cpu", weights_only=True)


def concatenate(chunks: Sequence[Results]) -> Results:
    """Join per-chunk results along the sample axis (the last), in the given order. A chunk whose samples
    were all unreadable holds only ``skipped``."""
    keys = list(dict.fromkeys(k for c in chunks for k in c))
    return {k: torch.cat([c[k] for c in chunks if k in c], dim=-1) for k in keys}


SKIPPED = "skipped"  # positions of samples that could not be read (results key, one entry per sample)


class _Readable(Dataset):
    """``dataset[positions[i]]`` as ``(i, image, label, None)``, or ``(i, None, None, why)`` when the sample
    cannot be read (a corrupt or truncated image file): one bad file must not stop a long run."""

    def __init__(self, dataset: Dataset, positions: Sequence[int]):
        self.dataset, self.positions = dataset, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        try:
            image, label = self.dataset[self.positions[i]]
        except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated files
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            return i, None, None, text
        return i, image, label, None


def _collate(items):
    """(positions read, images, labels, [(position, why) not read])."""
    good = [item for item in items if item[3] is None]
    bad = [(item[0], item[3]) for item in items if item[3] is not None]
    if not good:
        return [], None, None, bad
    images = torch.stack([torch.as_tensor(item[1]) for item in good])
    labels = torch.as_tensor([int(item[2]) for item in good], dtype=torch.long)
    return [item[0] for item in good], images, labels, bad


# ---- the run -----------------------------------------------------------------------------------------


def run_chunks(
    dataset: Dataset,
    positions: Sequence[int],
    process: Process,
    store: ChunkStore,
    batch_size: int,
    device: torch.device,
    processes: Optional[Processes] = None,
    seed: int = 0,
    fresh: bool = False,
    progress: bool = True,
    workers: int = 0,
    desc: str = "run",
) -> Optional[Results]:
    """Run ``process`` on every chunk of ``dataset[positions]`` and return all per-sample results.

    Each rank computes its missing chunks (one batch each, on ``device``, seeded with ``seed + start`` so
    random methods do not depend on sharding), saves them, and sends its chunks to rank 0. Returns the
    concatenated results (with ``position``, the sample's place in ``positions``) on rank 0, ``None``
    elsewhere. A tqdm bar on rank 0 shows samples/s and the ETA. A sample that cannot be read (a corrupt
    image file) is skipped with one line on stderr; its position is listed under ``skipped``.
    """
    processes = processes or Processes()
    if processes.main:
        store.open(fresh)
    processes.barrier()
    if not processes.main:
        store.open(False)  # verifies the manifest rank 0 wrote
    ranges = chunk_ranges(len(positions), batch_size)
    mine = ranges[processes.rank :: processes.world]
    todo = [c for c in mine if not store.has(c)]
    loader = DataLoader(
        _Readable(dataset, positions),
        batch_sampler=[list(range(a, b)) for a, b in todo],
        num_workers=workers,
        collate_fn=_collate,
    )
    bar = tqdm(
        total=sum(b - a for a, b in todo),
        desc=desc,
        unit="sample",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not (progress and processes.main),
        smoothing=0.1,
    )
    with bar:
        for chunk, (read, x, labels, bad) in zip(todo, loader):
            torch.manual_seed(seed + chunk[0])
            results: Results = {}
            if read:
                where = torch.tensor(read, dtype=torch.long, device=device)
                results = process(x.to(device), labels.to(device), where)
                results["position"] = where
            for position, why in bad:
                tqdm.write(
                    f"{desc}: skipped sample {position} (dataset index {positions[position]}): {why}", file=sys.stderr
                )
            results[SKIPPED] = torch.tensor([p for p, _ in bad], dtype=torch.long)
            store.save(chunk, results)
            bar.update(chunk[1] - chunk[0])
    gathered = processes.gather([(c, store.load(c)) for c in mine])
    processes.barrier()
    if gathered is None:
        return None
    by_chunk = dict(item for part in gathered for item in part)
    return concatenate([by_chunk[c] for c in ranges])

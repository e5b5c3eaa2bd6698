"""The checkpointer: it saves the run's registered state on schedule and restores it on a (re)start.

Each piece of state is a component registered under a name, with a scope that says who holds it and so
where it lives in the checkpoint folder:

- ``"shared"``: the same on every rank (the run's counters): rank 0 writes ``<name>.json``, every rank loads it;
- ``"per_rank"``: each rank's own (its RNG): ``<name>/rank_XXXXX.pt``; a rank new to the run keeps its own;
- ``"all_ranks"``: each rank's own, loaded as every rank's together (the data streams' positions, which a
  restart on another world size re-splits): rank 0 writes them all to ``<name>.json``;
- ``"files"``: a component that writes and reads its own files under the folder, sharded as it likes
  (DeepSpeed's engine, the EMA target).

The first three expose ``state_dict()`` / ``load_state_dict()``; ``"files"`` components ``save(folder, rank)``
and ``load(folder)``. Adding a piece of state to the run is one ``register`` call in the training loop.

One checkpoint is one folder, assembled by Ray Train from every rank's local folder (``ray.train.report``
copies all ranks' files into ``<storage>/<name>/<checkpoint_dir_name>``). A run's holds::

    deepspeed/state/...          DeepSpeed's sharded engine state (model, optimizer, per-rank ZeRO files)
    target_encoder/shard_*.pt    the EMA target, fp32 (vjepa_ray.train.target_encoder)
    rng/rank_*.pt                each rank's torch / numpy / python RNG state
    train_state.json             step, world size, counters (rank 0)
    data_position.json           every rank's place in its data stream (rank 0)
    config.yaml                  the run's config (rank 0)
    state_digest.json            with ``checkpoint.verify_restore``: the digest of the trained state (rank 0)
    manifest/rank_*.json         every rank's files with their sizes and SHA-256 (vjepa_ray.train.manifest)

A run that restarts with a different world size under ZeRO 1-3, or whose engine trains another set of
parameters than the checkpoint's (one saved before unused parameters were frozen), cannot load DeepSpeed's
partitioned files directly: ``needs_resharding`` says so, the engine is then built with
``checkpoint.load_universal`` and its component (``vjepa_ray.train.deepspeed_state``) loads through a universal
conversion of the files.

``save`` is the one place a checkpoint is written and handed to Ray Train; what a run keeps of its
checkpoints (``checkpoint.num_to_keep``, Ray's) is decided after it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from vjepa_ray import runs
from vjepa_ray.config import Config, to_yaml
from vjepa_ray.redaction import redact
from vjepa_ray.train import manifest
from vjepa_ray.train.deepspeed_state import needs_universal, saved_trained_parameters
from vjepa_ray.train.state import TrainState
from vjepa_ray.train.upload import persist_checkpoint

log = logging.getLogger(__name__)

TRAIN_STATE = runs.CHECKPOINT_MARKER
CONFIG_FILE = "config.yaml"
DIGEST_FILE = "state_digest.json"

Scope = Literal["shared", "per_rank", "all_ranks", "files"]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class FileState(Protocol):
    """State written as files of its own (sharded tensors too large to gather on one rank)."""

    def save(self, folder: Path, rank: int) -> None: ...

    def load(self, folder: Path) -> None: ...


@dataclass(frozen=True)
class SaveSchedule:
    """Which steps save a checkpoint: every ``every_steps`` (``checkpoint.every_steps``), the last step
    (``total_steps``), and the step at which a preemption notice arrived."""

    every_steps: int
    total_steps: int

    def due(self, step: int, preempted: bool = False) -> bool:
        """Whether the run saves after ``step`` steps."""
        return preempted or step == self.total_steps or step % self.every_steps == 0


@dataclass(frozen=True)
class _Component:
    name: str
    state: Any  # Stateful, or FileState for scope "files"
    scope: Scope


class Checkpointer:
    """What one rank saves and restores of the run, and when it saves.

    Every rank holds one, registers the same components in the same order, and calls ``save`` and ``restore``
    together (they hold collectives). ``damaged`` names checkpoints a restart skipped as damaged
    (``vjepa_ray.train.recovery``): a new save must not take one's name.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.schedule = SaveSchedule(cfg.checkpoint.every_steps, cfg.optimization.total_steps)
        self.verify = cfg.checkpoint.verify_restore
        self.components: list[_Component] = []
        self.damaged: list[str] = []
        # The digest of the state last restored, with ``checkpoint.verify_restore``.
        self.restored_digest: str | None = None
        # Whether the checkpoint ``needs_resharding`` last looked at holds the parameters the engine trains: a
        # digest saved over others cannot match the restored state's.
        self.same_parameters = True

    def register(self, name: str, state: Stateful | FileState, scope: Scope = "shared") -> None:
        if any(c.name == name for c in self.components):
            raise ValueError(f"a component named {name!r} is registered already")
        self.components.append(_Component(name, state, scope))

    def due(self, step: int, preempted: bool = False) -> bool:
        return self.schedule.due(step, preempted)

    # Saving.

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes every component into a node-local folder and reports it to Ray Train with ``metrics``, which
        copies every rank's folder into the run's ``step_XXXXXXXX`` checkpoint. Every rank calls it."""
        import ray.train

        folder = node_local_tempdir(f"vjepa_ckpt_{step}_")
        try:
            digest = self.digest() if self.verify else None
            if digest is not None:
                metrics["saved_state_digest"] = digest
            self.write(folder, digest)
            dist.barrier()
            upload = functools.partial(persist_checkpoint, retry_s=self.cfg.checkpoint.upload_retry_s)
            name = runs.checkpoint_dir_name(step, self.damaged)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload)
            if self.rank == 0:
                log.info("checkpoint %s saved", name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write(self, folder: Path, digest: str | None = None) -> None:
        """This rank's share of a checkpoint into its local ``folder``, the manifest last."""
        for component in self.components:
            if component.scope == "files":
                component.state.save(folder, self.rank)
            elif component.scope == "per_rank":
                (folder / component.name).mkdir(exist_ok=True)
                torch.save(component.state.state_dict(), folder / component.name / f"rank_{self.rank:05d}.pt")
            elif component.scope == "all_ranks":
                states: list[Any] = [None] * self.world_size
                dist.all_gather_object(states, component.state.state_dict())
                if self.rank == 0:
                    (folder / f"{component.name}.json").write_text(json.dumps(states, indent=1))
            elif self.rank == 0:
                (folder / f"{component.name}.json").write_text(json.dumps(component.state.state_dict(), indent=1))
        if self.rank == 0:
            (folder / CONFIG_FILE).write_text(to_yaml(redact(self.cfg)))
            if digest is not None:
                (folder / DIGEST_FILE).write_text(json.dumps({"sha256": digest}))
        manifest.write(folder, self.rank, self.world_size)

    def digest(self) -> str | None:
        """One digest over the components that can give one (``digest()``: the engine's weights and Adam
        moments); None when none can. A collective under ZeRO-3."""
        digests = [c.state.digest() for c in self.components if hasattr(c.state, "digest")]
        if not digests:
            return None
        return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()

    # Restoring.

    def needs_resharding(self, folder: str | Path, trained: set[str]) -> bool:
        """Whether DeepSpeed's state in checkpoint ``folder`` must go through a universal checkpoint to load on
        this world size into an engine that trains the parameters named ``trained`` (``needs_universal``): the
        engine is then built with ``load_universal``. Raises ``ConfigError`` for state that loads neither way
        (``saved_trained_parameters``). Sets ``same_parameters`` for ``restore``."""
        saved = read_train_state(folder)
        saved_trained = saved_trained_parameters(folder, trained)
        self.same_parameters = saved_trained is None or saved_trained == trained
        return needs_universal(saved.world_size, saved.zero_stage, self.world_size, self.cfg, saved_trained, trained)

    def restore(self, folder: str | Path, name: str) -> None:
        """Loads every component from the run's own checkpoint ``folder`` (``name`` in the messages)."""
        self._load(Path(folder), self.components)
        if self.verify:
            self.restored_digest = self.digest()
            saved = _saved_digest(Path(folder))
            if saved is not None and not self.same_parameters:
                log.warning("%s was saved with other trained parameters: its state digest cannot be compared", name)
            elif saved is not None and saved != self.restored_digest:
                raise RuntimeError(f"the state restored from {name} differs from the one saved there")

    def start_from(self, folder: str | Path, names: tuple[str, ...]) -> None:
        """Loads only the components ``names`` from another run's checkpoint ``folder``
        (``checkpoint.start_from``): its weights, optimizer state and EMA target, not its step, streams or RNG."""
        self._load(Path(folder), [c for c in self.components if c.name in names])

    def _load(self, folder: Path, components: list[_Component]) -> None:
        for component in components:
            if component.scope == "files":
                component.state.load(folder)
                continue
            if component.scope == "per_rank":
                state = _load_rank_file(folder / component.name / f"rank_{self.rank:05d}.pt")
            else:
                state = _read_json_state(folder, component.name)
                if state is None and self.rank == 0:
                    # (A damaged checkpoint never gets here: its manifest names the missing file.)
                    log.warning("%s holds no %s (saved before it was registered): it starts afresh", folder,
                                component.name)
            if state is not None:
                component.state.load_state_dict(state)


def _load_rank_file(path: Path) -> Any:
    """A rank's ``per_rank`` state, or None: a rank new to the run has none, and a file that needs the full
    unpickler (RNG files from before they held only tensors and plain values) is not unpickled. The step draws
    its masks and clips from explicit seeds, not from these generators, so the rank goes on with fresh ones."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s needs the full unpickler (an older checkpoint format): this rank keeps its own state", path)
        return None


def _read_json_state(folder: Path, name: str) -> Any:
    """A ``shared`` or ``all_ranks`` component's state, or None when the checkpoint has none. Checkpoints written
    before the data streams' positions had a file of their own kept them in ``train_state.json``."""
    path = folder / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    older = folder / TRAIN_STATE
    position = json.loads(older.read_text()).get(name) if older.exists() else None
    # Older still: rank 0's (epoch, chunk) alone.
    return [position] if isinstance(position, dict) else position


def read_train_state(folder: str | Path) -> TrainState:
    state = TrainState()
    state.load_state_dict(json.loads((Path(folder) / TRAIN_STATE).read_text()))
    return state


def _saved_digest(folder: Path) -> str | None:
    path = folder / DIGEST_FILE
    return json.loads(path.read_text())["sha256"] if path.exists() else None


def node_local_tempdir(prefix: str) -> Path:
    """A fresh local folder for one rank's share of a checkpoint (kept until Ray has copied it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))

"""Errors raised on Ray workers reach the driver whole: every exception class of the package survives pickling."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import vjepa_ray

# Arguments to build each class with, as the package raises it. A class missing here fails the walk below.
SAMPLE_ARGS = {
    "ConfigError": ("data.paths", "'/my/videoz' does not exist"),
    "NoUsableVideosError": ("data.paths", "none of the 3 videos could be decoded (corrupt 3)"),
    "VideoSkip": ("corrupt", "moov atom not found"),
    "StorageRefusedError": ("access denied",),
    "StorageUnreachableError": ("no route to host",),
    "IncompleteUploadError": ("2 files missing",),
    "NoIntactCheckpointError": ("every checkpoint is damaged",),
    "DestinationError": ("DEST holds another preparation",),
    "NonFiniteStateError": ("the weights hold a non-finite value",),
    "LossRegulationError": ("11 steps in a row held back by loss regulation",),
    "RunStopped": ("target collapsed", {"step": 4, "loss": 170.3}),
    "_TimestampMismatch": ("frame 3",),
}


def package_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of the package (modules that need an extra skip)."""
    found = {}
    for module_info in pkgutil.walk_packages(vjepa_ray.__path__, "vjepa_ray."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:  # an optional extra (e.g. MLflow's UI) that this environment lacks
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("vjepa_ray."):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return sorted(found.values(), key=lambda cls: (cls.__module__, cls.__qualname__))


EXCEPTIONS = package_exceptions()


def test_the_walk_finds_the_package_errors():
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"ConfigError", "NoUsableVideosError", "VideoSkip"} <= names
    assert names <= set(SAMPLE_ARGS), f"add sample arguments for {sorted(names - set(SAMPLE_ARGS))}"


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_exception_survives_a_pickle_round_trip(cls):
    error = cls(*SAMPLE_ARGS[cls.__name__])
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)


def test_a_data_error_is_a_config_error_naming_data_paths():
    from vjepa_ray.config import ConfigError
    from vjepa_ray.data.pipeline import NoUsableVideosError

    error = pickle.loads(pickle.dumps(NoUsableVideosError("data.paths", "none of the 3 videos could be decoded")))
    assert isinstance(error, ConfigError) and error.key == "data.paths"
    assert str(error) == "data.paths: none of the 3 videos could be decoded"

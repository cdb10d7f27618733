"""Hugging Face datasets as `prefix data prepare` inputs: `save_to_disk` folders and the local cache by name.

Both end as the Arrow files `datasets` itself reads, which `sources.py` streams in record batches
like parquet. A saved folder is found from its own metadata with the standard library, so it
needs no `datasets` install; a name (`hf:owner/name[:config][@split]`) is looked up with
`datasets.load_dataset` in offline mode, so a name that is not cached is an error, never a
download. A DatasetDict is read one split at a time: `train` unless another is named, since
reading every split would put the test set into training.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from prefix.errors import UserError

HUB = "hf:"
"""The prefix of an input naming a dataset in the local Hugging Face cache."""
DEFAULT_SPLIT = "train"
SPEC = "hf:NAME[:CONFIG][@SPLIT]"


def choose_split(splits: list[str], where: str, pick: Callable[[str], str]) -> str:
    """`train`, else the only split; among several others the user chooses (`pick(split)` says how)."""
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(splits) == 1:
        return splits[0]
    raise UserError(f"{where}: has splits {', '.join(splits) or '(none)'} and no '{DEFAULT_SPLIT}'; name the one "
                    f"to read: {pick(splits[0] if splits else 'SPLIT')}")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable as the JSON datasets writes ({e}); save the dataset again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not the JSON object datasets writes; save the dataset again")
    return data


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder (a DatasetDict: of its chosen split), or None if it is not one.

    Given in the order of `state.json`, which is the dataset's row order.
    """
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise UserError(f"{folder / 'dataset_dict.json'}: has no list of splits; save the dataset again")
        split = choose_split(splits, f"{folder} (a saved DatasetDict)", lambda split: str(folder / split))
        files = saved_dataset_files(folder / split)
        if files is None:
            raise UserError(f"{folder / split}: not a saved split (no state.json); save the dataset again")
        return files
    if (folder / "state.json").is_file():
        files = _json(folder / "state.json").get("_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise UserError(f"{folder / 'state.json'}: lists no data files; save the dataset again")
        return [folder / f["filename"] for f in files]
    if (folder / "dataset_info.json").is_file() and any(folder.glob("*.arrow")):
        raise UserError(f"{folder}: a Hugging Face datasets cache folder, not a saved dataset; pass the dataset by "
                        f"name ({SPEC}) or save_to_disk it and pass that folder")
    return None


def is_hub_name(spec: str) -> bool:
    return spec.startswith(HUB)


def cached_dataset(spec: str) -> tuple[list[tuple[Path, str]], str]:
    """(Arrow file, identity) pairs of one split of a dataset in the local cache, and its resolved `hf:` name.

    Identities are `NAME/CONFIG/<file>`: stable wherever the cache lives.
    """
    name, config, split = _parse(spec)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: reading a dataset by name needs the datasets library; "
                        "pip install 'prefix-train[hf]'") from None
    if Path(name).is_dir():  # load_dataset would read this folder, not the cache
        raise UserError(f"{spec}: ./{name} is a folder here, which datasets would read instead of the cache; "
                        "run from another folder, or pass the folder itself if it is the data")
    with _offline(datasets):
        try:  # every split: memory-mapped files, nothing read yet; the split is chosen below, like a folder's
            splits = datasets.load_dataset(name, config)
        except (ConnectionError, FileNotFoundError):
            cache = datasets.config.HF_DATASETS_CACHE
            raise UserError(f"{spec}: not in the local Hugging Face datasets cache ({cache}), and prepare never "
                            f"downloads; run datasets.load_dataset({name!r}) once on a machine with internet and "
                            "copy its cache folder here (HF_DATASETS_CACHE, or HF_HOME/datasets, names it), or "
                            "save_to_disk the dataset there and pass that folder") from None
        except ValueError as e:  # a config the cache does not have, or several and none named
            problem = " ".join(str(e).split("\nPlease")[0].split())  # one line, without its "load_dataset(...)"
            raise UserError(f"{spec}: {problem}; name a cached config: hf:{name}:CONFIG") from None
    chosen = split or choose_split(list(splits), spec, lambda s: f"hf:{name}{f':{config}' if config else ''}@{s}")
    if chosen not in splits:
        raise UserError(f"{spec}: no split '{chosen}' (splits: {', '.join(splits)}); name one of them")
    dataset = splits[chosen]
    resolved = dataset.info.config_name or config or "default"
    files = [Path(f["filename"]) for f in dataset.cache_files]
    return [(f, f"{name}/{resolved}/{f.name}") for f in files], f"hf:{name}:{resolved}@{chosen}"


def _parse(spec: str) -> tuple[str, str | None, str | None]:
    """`hf:owner/name:config@split` → (owner/name, config or None, split or None)."""
    rest, at, split = spec.removeprefix(HUB).partition("@")
    name, colon, config = rest.partition(":")
    if "" in name.split("/") or name.count("/") > 1 or (at and not split) or (colon and not config):
        raise UserError(f"{spec}: not a dataset name; write {SPEC}, e.g. hf:owner/name or hf:owner/name:config@test")
    return name, config or None, split or None


@contextlib.contextmanager
def _offline(datasets) -> Iterator[None]:
    """Offline and quiet for this load only. The libraries read HF_HUB_OFFLINE from the environment once, at
    import, into these flags, which they check at each call (the second is the older datasets' name)."""
    import huggingface_hub.constants as hub

    switches = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"), (hub, "HF_HUB_OFFLINE")]
    saved, verbosity = [getattr(m, flag, False) for m, flag in switches], datasets.logging.get_verbosity()
    for module, flag in switches:
        setattr(module, flag, True)
    datasets.logging.set_verbosity_error()  # "Using the latest cached version ...": expected here, not news
    try:
        yield
    finally:
        for (module, flag), value in zip(switches, saved, strict=True):
            setattr(module, flag, value)
        datasets.logging.set_verbosity(verbosity)

"""tfds builders that write the four record kinds as array_record, and `open_source` to read them.

`build_dataset(kind, name, data_dir, splits)` takes, per split, either records generated in Python
(any iterable of record dicts, see `records`) or a JSONL or Parquet file (``files``, tokenised),
and writes ``<data_dir>/rlhf_<kind>/<name>/1.0.0/`` (tfds layout: builder / config / version).
It returns that path; `open_source(path, split)` reads it back with ``tfds`` ``as_data_source``
(no TensorFlow). Records are written in the order given (``disable_shuffling``): loaders shuffle.

Nothing is half-written: records are validated while tfds writes them into a temporary directory
inside ``data_dir``, which is renamed into place only when every split has been written, so a
malformed record leaves no dataset directory behind and an existing dataset is replaced only by a
complete new one. Build on one process (process 0) when ``data_dir`` is shared between hosts.

The dataset's metadata (``metadata.json``, see `read_metadata`) records its kind and the longest
prompt/response/text and the most completions seen, so loaders can check their fixed shapes up
front instead of failing mid-training.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.files import Tokenizer, read_records
from rlhf_jax.data.records import Budgets, DataError, Kind, as_kind, to_storage, validate_record

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SPLIT_RE = re.compile(r"^\w+$")

# Stored features per kind: every field is a 1-D int32 tensor (comparisons flattened, see records).
_STORAGE_FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.DEMONSTRATIONS: ("prompt", "response"),
    Kind.COMPARISONS: ("prompt", "responses", "response_lengths", "ranks"),
    Kind.PROMPTS: ("prompt",),
    Kind.PRETRAINING: ("text",),
}


# Registration is skipped: datasets are opened by path (`open_source`), and a registry entry would
# only add name collisions (e.g. a notebook re-importing this module).
class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the records handed to the constructor, one split per ``split_records`` entry."""

    KIND: ClassVar[Kind]
    VERSION = tfds.core.Version(VERSION)
    # Keep the given order on disk: reproducible files, and record i of a split is the i-th given.
    disable_shuffling = True

    # tfds looks for checksum and doc files next to a builder's module through importlib_resources,
    # which is not a dependency here; these builders download nothing and ship no such files.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def __init__(
        self,
        *,
        split_records: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        budgets: Budgets | None = None,
        eos_id: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._split_records = dict(split_records or {})
        self._budgets = budgets or Budgets()
        self._eos_id = eos_id
        self._metadata = dict(metadata or {})
        super().__init__(**kwargs)

    # tfds prints "Downloading and preparing dataset ..." and "... downloaded and prepared" on
    # stdout; nothing is downloaded here.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _create_builder_config(
        self, builder_config: Any, version: Any
    ) -> tfds.core.BuilderConfig | None:
        # Each dataset name is a config unknown to the class, which tfds accepts with a warning on
        # every build ("Using custom data configuration"); it is the intended use here.
        return builder_config

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            f: tfds.features.Tensor(shape=(None,), dtype=np.int32)
            for f in _STORAGE_FIELDS[self.KIND]
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"rlhf_jax {self.KIND.value} records (token ids).",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(kind=self.KIND.value, **self._metadata),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing is downloaded.
        return {s: self._generate_examples(s, r) for s, r in self._split_records.items()}

    def _generate_examples(
        self, split: str, records: Iterable[Mapping[str, Any]]
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        meta = self.info.metadata  # Written to metadata.json after all splits are generated.
        count = 0
        for i, record in enumerate(records):
            rec = validate_record(
                self.KIND, record, f"split '{split}' record {i}", self._budgets, eos_id=self._eos_id
            )
            for key, length in _lengths(self.KIND, rec).items():
                meta[key] = max(int(meta.get(key, 0)), length)
            count += 1
            yield i, to_storage(self.KIND, rec)
        if count == 0:
            raise DataError(f"split '{split}'", None, "no records")


def _lengths(kind: Kind, rec: Mapping[str, Any]) -> dict[str, int]:
    if kind is Kind.PRETRAINING:
        return {"max_text_len": len(rec["text"])}
    out = {"max_prompt_len": len(rec["prompt"])}
    if kind is Kind.DEMONSTRATIONS:
        out["max_response_len"] = len(rec["response"])
    elif kind is Kind.COMPARISONS:
        out["max_response_len"] = max(len(r) for r in rec["responses"])
        out["max_completions"] = len(rec["responses"])
    return out


class RlhfDemonstrations(_RecordsBuilder, skip_registration=True):
    """Demonstrations: {prompt, response}."""

    KIND = Kind.DEMONSTRATIONS


class RlhfComparisons(_RecordsBuilder, skip_registration=True):
    """Comparisons: {prompt, responses (flattened), response_lengths, ranks}."""

    KIND = Kind.COMPARISONS


class RlhfPrompts(_RecordsBuilder, skip_registration=True):
    """Prompts: {prompt}."""

    KIND = Kind.PROMPTS


class RlhfPretraining(_RecordsBuilder, skip_registration=True):
    """Pretraining text: {text}."""

    KIND = Kind.PRETRAINING


BUILDERS: dict[Kind, type[_RecordsBuilder]] = {
    b.KIND: b for b in (RlhfDemonstrations, RlhfComparisons, RlhfPrompts, RlhfPretraining)
}


def dataset_path(kind: Kind | str, name: str, data_dir: str | os.PathLike) -> Path:
    """Where `build_dataset` puts a dataset: ``<data_dir>/rlhf_<kind>/<name>/<VERSION>``."""
    return Path(data_dir) / BUILDERS[as_kind(kind)].name / name / VERSION


def build_dataset(
    kind: Kind | str,
    name: str,
    data_dir: str | os.PathLike,
    splits: Mapping[str, Iterable[Mapping[str, Any]] | str | os.PathLike],
    *,
    tokenizer: Tokenizer | None = None,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    max_text_len: int | None = None,
    too_long: str = "error",
    eos_id: int | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Validates and writes a dataset atomically; returns its path (see `dataset_path`).

    Args:
      kind: one of `Kind` ("demonstrations", "comparisons", "prompts", "pretraining").
      name: the dataset's name (letters, digits, ``_.-``).
      data_dir: root directory holding datasets.
      splits: split name -> records (an iterable of record dicts, consumed once) or a JSONL or
        Parquet path (``rlhf_jax.data.files``).
      tokenizer: needed for file splits; its EOS is also required at the end of every response.
      max_prompt_len, max_response_len, max_text_len: token budgets P, R (EOS included), T;
        a record over budget is a `DataError` (a file's pretraining text over T is split).
      too_long: for file splits, "drop" skips a prompt or response over its budget
        (``files.read_records``).
      eos_id: for Python records, the EOS id every response must end with (None: not checked).
      overwrite: replace an existing dataset (only once the new one is complete).
      metadata: extra JSON-able entries for the dataset's metadata (``read_metadata``), such as
        the fingerprint of its source.

    Raises:
      DataError: a malformed record, naming ``file:line`` (or split and record index) and field.
      FileExistsError: the dataset exists and ``overwrite`` is False.
    """
    kind = as_kind(kind)
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r}: expected letters, digits, '_', '.', '-'")
    if not splits:
        raise ValueError("splits: expected at least one split")
    budgets = Budgets(max_prompt_len, max_response_len, max_text_len)
    if tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    sources: dict[str, Iterable[Mapping[str, Any]]] = {}
    for split, src in splits.items():
        if not _SPLIT_RE.match(split):
            raise ValueError(f"split name {split!r}: expected letters, digits and '_'")
        if isinstance(src, (str, os.PathLike)):
            if tokenizer is None:
                raise ValueError(f"split '{split}': a file needs a tokenizer")
            if not os.path.isfile(src):
                raise DataError(os.fspath(src), None, f"no such file (for split '{split}')")
            sources[split] = read_records(
                src,
                kind,
                tokenizer,
                max_prompt_len=max_prompt_len,
                max_response_len=max_response_len,
                max_text_len=max_text_len,
                too_long=too_long,
            )
        else:
            sources[split] = src
    final = dataset_path(kind, name, data_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(f"dataset exists: {final} (pass overwrite=True to replace it)")

    root = Path(data_dir)
    # The outermost directory this call creates (e.g. the work directory itself), so that a
    # failed build leaves the file system as it found it.
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    root.mkdir(parents=True, exist_ok=True)
    # Inside data_dir, so the final rename stays on one filesystem (and is atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    ok = False
    try:
        with _tempdir_inside(tmp):
            builder = BUILDERS[kind](
                data_dir=os.fspath(tmp),
                config=tfds.core.BuilderConfig(name=name),
                file_format="array_record",
                split_records=sources,
                budgets=budgets,
                eos_id=eos_id,
                metadata=dict(metadata or {}),
            )
            builder.download_and_prepare()
        swap_into_place(Path(os.fspath(builder.data_path)), final, tmp / "previous")
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created)
    return final


@contextlib.contextmanager
def _tempdir_inside(path: Path) -> Iterator[None]:
    """Point ``tempfile`` at ``path`` for a while: a new tfds builder makes a scratch directory
    with ``tempfile.mkdtemp`` (``DatasetInfo.initialize_from_bucket``) and never removes it, so
    without this every dataset we build would leave an empty directory in the system temp dir."""
    saved = tempfile.tempdir
    tempfile.tempdir = os.fspath(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def swap_into_place(built: Path, final: Path, trash: Path) -> None:
    """``built`` becomes ``final``; an existing ``final`` is moved to ``trash`` first (and put back
    if the move fails), so ``final`` is never half-written or missing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.rename(built, final)
        return
    os.rename(final, trash)
    try:
        os.rename(built, final)
    except BaseException:
        os.rename(trash, final)  # Put the old dataset back rather than leave none.
        raise


def open_source(path: str | os.PathLike, split: str = "train") -> Sequence[Any]:
    """The tfds array_record data source of one split (random access, ``len``, no TensorFlow).

    ``split`` takes the tfds split syntax (``"train"``, ``"train[:10%]"``). Items are dicts of
    1-D int32 arrays in the stored form (`records.from_storage` gives the in-memory form).
    """
    return tfds.builder_from_directory(os.fspath(path)).as_data_source(split=split)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Kind, longest lengths seen (``max_prompt_len`` ...), and ``splits``: name -> #records."""
    info = tfds.builder_from_directory(os.fspath(path)).info
    meta = dict(info.metadata or {})
    meta["splits"] = {name: int(s.num_examples) for name, s in info.splits.items()}
    return meta

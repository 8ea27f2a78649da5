"""The ground of the command layer: what every ``cvlab`` command shares about its command line.

:mod:`experiments.cli` (the entry point), :mod:`experiments.lightning_cli` (LightningCLI), :mod:`experiments.pipeline`
(``cvlab run``) and :mod:`experiments.sweep` (``cvlab sweep``) all use what is here, and this module imports none
of them (nor torch or Lightning), so the commands import one another one way only (``tests/test_layering.py``):

- :func:`format_value` / :func:`as_overrides`: a value, a mapping of dotted keys, as ``--key=value`` arguments;
- :func:`check_config_files`: every ``--config`` file exists and is a YAML mapping, checked before any heavy import;
- :func:`load_yaml_file`: a user's YAML file (config, pipeline, sweep), with one-line errors for invalid YAML and
  for a key written twice in one mapping (which YAML parsers otherwise settle silently: the last one wins);
- :class:`OneLineArgumentParser`: argparse whose errors are one :class:`~cvlab.errors.CvlabError` line;
- :func:`user_error_line`: the one line to print for a user's mistake (None for a bug, which keeps its traceback);
- :func:`one_line_warning`: a warning as one ``cvlab: warning: ...`` line (a ``warnings.formatwarning``).
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvlab.errors import CvlabError


def format_value(v: Any) -> str:
    """A value as the CLI reads it on the command line: ``true``/``false``, JSON for lists, mappings and None."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)) or v is None:
        return json.dumps(v)
    return str(v)


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``--key=value`` for each dotted key of ``values``, in their order."""
    return [f"--{k}={format_value(v)}" for k, v in values.items()]


def config_files(argv: list[str]) -> list[str]:
    """The values of ``--config X``, ``--config=X`` and ``-c X`` on a command line."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed content of the YAML file ``path``; a :class:`~cvlab.errors.CvlabError` naming ``what``, the file and
    the line when it is not valid YAML, cannot be read, or writes one key twice in a mapping (a plain YAML load
    keeps the last and silently drops the first, e.g. a second ``report:`` block of a pipeline record)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:  # the keys as written: overriding a merged (<<) key is no duplicate
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise CvlabError(f"{what} {path}: key {key!r} is written twice in one mapping (lines "
                                             f"{seen[key]} and {line}); YAML would keep only the last: merge or "
                                             "rename one")
                        seen[key] = line
                    except TypeError:  # an unhashable key: the constructor below reports it
                        continue
            return super().construct_mapping(node, deep=deep)

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CvlabError(f"cannot read {what} {path}: {e}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CvlabError(f"{what} {path} is not valid YAML: {problem}{at}") from None


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is a non-empty YAML mapping; else one line naming the file (before
    any heavy import). A value that is not a file name (inline YAML such as ``{trainer: ...}``) is left to
    the parser."""
    for value in config_files(argv):
        path = Path(value)
        if not path.is_file():
            if value.lstrip().startswith(("{", "[")) or "\n" in value or ": " in value:
                continue
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise CvlabError(f"config file not found: {value}{where}")
        content = load_yaml_file(value)
        if content is None:
            raise CvlabError(f"config file {value} is empty; a config names at least model: and data: "
                             "(see experiments/quickstart.yaml)")
        if not isinstance(content, dict):
            raise CvlabError(f"config file {value} holds a {type(content).__name__}, not a mapping of keys "
                             "(model:, data:, trainer:, ...)")


def error_chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it was raised from or during, breadth first, each once."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]


def one_line(text: str) -> str:
    """``text`` on one line, without terminal colour codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())


def user_error_line(e: BaseException) -> str | None:
    """The one line to print for a user's mistake, or None for a bug (which keeps its traceback)."""
    chain = list(error_chain(e))
    for x in chain:
        if isinstance(x, CvlabError):
            return one_line(str(x))
    for x in chain:
        if isinstance(x, OSError) and x.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return one_line(
                f"cannot write {x.filename or 'a file'}: {x.strerror}; choose a writable --run.root or --run.dir "
                "(or fix the folder's permissions)"
            )
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return one_line(
                f"no space left writing {x.filename or 'a file'}: {x.strerror}; free space or choose another --run.root"
            )
        if isinstance(x, RuntimeError) and ("channels, but got" in str(x) or "shapes cannot be multiplied" in str(x)):
            return one_line(
                f"a network does not accept the data's images ({str(x).splitlines()[0]}); check that the model's or "
                "teacher's in_channels, image_size and num_classes match the data's"
            )
        if isinstance(x, urllib.error.URLError):
            return one_line(
                f"network unreachable ({x.reason}); run where there is a network, or use files already on disk"
            )
        if type(x).__name__ == "MisconfigurationException":  # Lightning's word for a config that cannot run
            return one_line(str(x).strip().splitlines()[0] if str(x).strip() else "invalid trainer configuration")
        if isinstance(x, RuntimeError) and str(x).startswith("Error(s) in loading state_dict for "):
            lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
            return one_line(f"the checkpoint does not fit the model: {' '.join(lines[:3])[:400]}; configure the model "
                            "as it was trained (its run folder's config.yaml), or pass another --ckpt_path")
        if isinstance(x, ValueError) and re.match(r"Invalid [a-z_ ]+(value|rate|parameter)", str(x)):
            return one_line(f"invalid optimiser setting: {x}")
    return None


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A warning as one ``cvlab: warning: ...`` line (Python's default adds the file and the source line)."""
    return f"cvlab: warning: {one_line(str(message)).removeprefix('cvlab: ')}\n"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`CvlabError` line (the usage is for ``--help``); no key prefixes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> Any:
        raise CvlabError(f"{message} (`{self.prog} --help` lists the options)")

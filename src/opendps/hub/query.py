"""A well-defined subset of the IoT Hub query language, over device twin documents (``POST /devices/query``).

Supported (keywords and function names case-insensitive; property names are not)::

    SELECT [TOP n] * | COUNT() [AS alias] | path [AS alias], path [AS alias], ...
    FROM devices
    [WHERE condition]

    condition := condition OR condition | condition AND condition | NOT condition | ( condition )
               | operand (= | != | <> | < | <= | > | >=) operand
               | operand [NOT] IN [literal, ...] | operand NIN [literal, ...]
               | IS_DEFINED(path) | IS_NULL | IS_BOOL | IS_NUMBER | IS_STRING | IS_OBJECT | IS_ARRAY | IS_PRIMITIVE
               | STARTSWITH(path, 'text') | ENDSWITH(path, 'text')
    operand   := path | literal       path := name ('.' name | '[' 'name' ']')*
    literal   := 'text' | "text" | number | true | false | null

Evaluation is three-valued, as IoT Hub's (Cosmos DB's) SQL: a comparison with a missing property, or between
values of different types (or ``<``/``>`` on anything but two numbers or two strings), is *undefined*; ``NOT``
of undefined is undefined; AND/OR follow SQL's rules; only a condition that is true selects a twin. So
``tags.x != 'a'`` does not select twins without ``tags.x`` (write ``NOT IS_DEFINED(tags.x) OR tags.x != 'a'``).
A projection names its column by the alias or the path's last name and leaves out a missing value;
``COUNT()`` without an alias is named ``$1``.

Everything else (GROUP BY, ORDER BY, other collections, other functions, arithmetic, JOIN) is refused with
:class:`InvalidInput` naming the unsupported part, never evaluated loosely. Pure: :func:`parse_query` once,
then :meth:`Query.matches` / :meth:`Query.project` over any twin document; :meth:`opendps.hub.Hubs.query`
pages through a hub's twins with the continuation tokens made here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from opendps.errors import InvalidInput
from opendps.transport.wire import json_kind, parse_json

MAX_QUERY_LENGTH = 8192
MAX_NESTING = 32  # parentheses and NOTs: deeper is refused, never a RecursionError
COUNT_DEFAULT_NAME = "$1"
MAX_KEY_LENGTH = 128  # a device key (a device id, lower-cased) in a continuation token


class _Undefined(Enum):
    """A property the document does not have (distinct from JSON null)."""

    UNDEFINED = 0


UNDEFINED = _Undefined.UNDEFINED
Truth = bool | None  # None: undefined


def _refuse(message: str, pos: int | None = None) -> InvalidInput:
    return InvalidInput(f"query: {message}" + (f" (at position {pos})" if pos is not None else ""))


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    kind: str  # ident | string | number | symbol | end
    text: str  # as written (a string token: its decoded value)
    pos: int  # 1-based position of the first character
    value: Any = None  # the literal value of a string or number token

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the query"
        if self.kind == "string":
            return f"the string {json.dumps(self.text)}"
        return f"'{self.text}'"


_LEXEME = re.compile(r"(?P<space>\s+)|(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)"
                     r"|(?P<symbol><>|!=|<=|>=|[=<>()\[\],.*+\-/%])")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``start`` (its quote) and the index after its closing quote."""
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            code = text[i + 1:i + 2]
            if code == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[i + 2:i + 6]):
                out.append(chr(int(text[i + 2:i + 6], 16)))
                i += 6
                continue
            if code not in _ESCAPES:
                raise _refuse(f"invalid escape \\{code} in a string", i + 1)
            out.append(_ESCAPES[code])
            i += 2
            continue
        out.append(c)
        i += 1
    raise _refuse("unterminated string", start + 1)


_MAX_DIGITS = 309  # the digits of the largest double (1.8e308)


def tokenize(text: str) -> list[Token]:
    """The query's tokens, ending with an ``end`` token."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i] in "'\"":
            value, end = _string(text, i)
            tokens.append(Token("string", value, i + 1, value))
            i = end
            continue
        m = _LEXEME.match(text, i)
        if m is None:
            raise _refuse(f"unexpected character {text[i]!r}", i + 1)
        kind = m.lastgroup or ""
        if kind == "number":
            tokens.append(Token("number", m.group(), i + 1, _number(m.group(), i + 1)))
        elif kind != "space":
            tokens.append(Token(kind, m.group(), i + 1))
        i = m.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


def _number(text: str, pos: int) -> int | float:
    if re.fullmatch(r"\d+", text):
        if len(text) > _MAX_DIGITS:  # beyond any double; also int()'s 4,300-digit limit (a ValueError, not a refusal)
            raise _refuse(f"number {text[:16]}... ({len(text)} digits) is out of range", pos)
        return int(text)
    value = float(text)
    if math.isinf(value):
        raise _refuse(f"number {text} is out of range", pos)
    return value


# ---------------------------------------------------------------- values


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict | list):  # JSON equality: True is not 1 inside objects either
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return bool(a == b)


_ORDER: dict[str, Callable[[Any, Any], bool]] = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
                                                 ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def compare(op: str, a: Any, b: Any) -> Truth:
    """``a op b`` in three-valued logic: undefined (None) for a missing side or values of different types."""
    if a is UNDEFINED or b is UNDEFINED or json_kind(a) != json_kind(b):
        return None
    if op == "=":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if json_kind(a) not in ("number", "string"):
        return None
    return _ORDER[op](a, b)


# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Path:
    """A dotted property path into the twin document (``properties.reported.temperature``)."""

    names: tuple[str, ...]

    def resolve(self, doc: Any) -> Any:
        """The value at this path, or :data:`UNDEFINED`."""
        node = doc
        for name in self.names:
            if not isinstance(node, dict) or name not in node:
                return UNDEFINED
            node = node[name]
        return node

    def __str__(self) -> str:
        return ".".join(self.names)


@dataclass(frozen=True)
class Literal:
    value: str | int | float | bool | None

    def resolve(self, doc: Any) -> Any:
        return self.value


Operand = Path | Literal


class Condition:
    """A WHERE condition; :meth:`evaluate` is three-valued (None = undefined)."""

    def evaluate(self, doc: Any) -> Truth:
        raise NotImplementedError


@dataclass(frozen=True)
class Comparison(Condition):
    left: Operand
    op: str  # = != < <= > >=  (<> is read as !=)
    right: Operand

    def evaluate(self, doc: Any) -> Truth:
        return compare(self.op, self.left.resolve(doc), self.right.resolve(doc))


@dataclass(frozen=True)
class Membership(Condition):
    """``operand IN [...]`` (an OR of equalities) or, ``negated``, ``NIN`` / ``NOT IN``."""

    operand: Operand
    values: tuple[str | int | float | bool | None, ...]
    negated: bool

    def evaluate(self, doc: Any) -> Truth:
        value = self.operand.resolve(doc)
        found = _any(compare("=", value, v) for v in self.values)
        return found if found is None or not self.negated else not found


@dataclass(frozen=True)
class TypeCheck(Condition):
    """``IS_DEFINED(path)`` and the other ``IS_*`` checks: true or false, never undefined."""

    function: str
    path: Path

    def evaluate(self, doc: Any) -> Truth:
        return TYPE_CHECKS[self.function](self.path.resolve(doc))


@dataclass(frozen=True)
class StringMatch(Condition):
    """``STARTSWITH(path, 'text')`` / ``ENDSWITH(path, 'text')``: undefined unless the value is a string."""

    function: str
    path: Path
    text: str

    def evaluate(self, doc: Any) -> Truth:
        value = self.path.resolve(doc)
        if not isinstance(value, str):
            return None
        return value.startswith(self.text) if self.function == "STARTSWITH" else value.endswith(self.text)


@dataclass(frozen=True)
class Not(Condition):
    inner: Condition

    def evaluate(self, doc: Any) -> Truth:
        result = self.inner.evaluate(doc)
        return None if result is None else not result


@dataclass(frozen=True)
class And(Condition):
    parts: tuple[Condition, ...]

    def evaluate(self, doc: Any) -> Truth:
        result: Truth = True
        for part in self.parts:
            value = part.evaluate(doc)
            if value is False:
                return False
            if value is None:
                result = None
        return result


@dataclass(frozen=True)
class Or(Condition):
    parts: tuple[Condition, ...]

    def evaluate(self, doc: Any) -> Truth:
        return _any(part.evaluate(doc) for part in self.parts)


def _any(values: Any) -> Truth:
    """SQL's OR over three-valued results: true if one is true, false if all are false, else undefined."""
    result: Truth = False
    for value in values:
        if value is True:
            return True
        if value is None:
            result = None
    return result


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "IS_DEFINED": lambda v: v is not UNDEFINED,
    "IS_NULL": lambda v: v is None,
    "IS_BOOL": lambda v: isinstance(v, bool),
    "IS_NUMBER": _is_number,
    "IS_STRING": lambda v: isinstance(v, str),
    "IS_OBJECT": lambda v: isinstance(v, dict),
    "IS_ARRAY": lambda v: isinstance(v, list),
    "IS_PRIMITIVE": lambda v: v is None or isinstance(v, bool | str) or _is_number(v),
}
STRING_FUNCTIONS = ("STARTSWITH", "ENDSWITH")
AGGREGATES = ("SUM", "AVG", "MIN", "MAX")
COMPARISONS = {"=": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# words that cannot start a property path (a property with such a name: ['name'] after another name)
RESERVED = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "NIN", "AS", "TOP", "GROUP", "BY", "ORDER", "TRUE",
            "FALSE", "NULL", "JOIN", "DISTINCT", "VALUE", "LIKE", "BETWEEN", "IS"}
_LITERAL_WORDS: dict[str, bool | None] = {"TRUE": True, "FALSE": False, "NULL": None}


@dataclass(frozen=True)
class Projection:
    path: Path
    name: str


@dataclass(frozen=True)
class Query:
    """A parsed query: what it selects, its condition, its TOP."""

    text: str
    star: bool
    count: str | None  # the column name of SELECT COUNT()
    projections: tuple[Projection, ...]
    condition: Condition | None
    top: int | None

    @property
    def item_type(self) -> str:
        """Azure's ``x-ms-item-type``: twin documents for ``SELECT *``, anything else raw."""
        return "Twin" if self.star else "Raw"  # C#'s QueryResultType is parsed case-sensitively

    @property
    def fingerprint(self) -> str:
        """Binds a continuation token to the query it continues."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def matches(self, doc: dict[str, Any]) -> bool:
        """Whether the WHERE condition is true (not false, not undefined) for this twin document."""
        return self.condition is None or self.condition.evaluate(doc) is True

    def project(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The result row for a matching document (``SELECT *``: the document itself)."""
        if self.star:
            return doc
        row: dict[str, Any] = {}
        for p in self.projections:
            value = p.path.resolve(doc)
            if value is not UNDEFINED:
                row[p.name] = value
        return row


# ---------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over the tokens; every refusal names the token and its position."""

    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        token = self.peek()
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return token

    def is_word(self, *words: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "ident" and token.text.upper() in words

    def is_symbol(self, *symbols: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "symbol" and token.text in symbols

    def expect_word(self, word: str, where: str) -> None:
        if not self.is_word(word):
            token = self.peek()
            raise _refuse(f"expected {word} {where}, found {token.describe()}", token.pos)
        self.next()

    def expect_symbol(self, symbol: str, where: str) -> None:
        if not self.is_symbol(symbol):
            token = self.peek()
            raise _refuse(f"expected '{symbol}' {where}, found {token.describe()}", token.pos)
        self.next()

    # ---- the query ----
    def query(self, text: str) -> Query:
        self.expect_word("SELECT", "at the start of the query")
        top = self.top()
        if self.is_word("DISTINCT", "VALUE"):
            raise _refuse(f"SELECT {self.peek().text.upper()} is not supported", self.peek().pos)
        star, count, projections = self.selection()
        if top is not None and count is not None:
            raise _refuse("TOP cannot be combined with COUNT()")
        self.expect_word("FROM", "after the selection")
        self.collection()
        condition = None
        if self.is_word("WHERE"):
            self.next()
            condition = self.disjunction()
        self.end(condition is not None)
        return Query(text, star, count, projections, condition, top)

    def top(self) -> int | None:
        if not self.is_word("TOP"):
            return None
        self.next()
        token = self.next()
        if token.kind != "number" or not isinstance(token.value, int) or token.value < 1:
            raise _refuse(f"TOP needs a whole number of at least 1, found {token.describe()}", token.pos)
        return int(token.value)

    def selection(self) -> tuple[bool, str | None, tuple[Projection, ...]]:
        if self.is_symbol("*"):
            self.next()
            if self.is_symbol(","):
                raise _refuse("* cannot be combined with other selections", self.peek().pos)
            return True, None, ()
        count: str | None = None
        projections: list[Projection] = []
        while True:
            start = self.peek()
            if self.is_word("COUNT") and self.is_symbol("(", ahead=1):
                self.next()
                self.next()
                self.expect_symbol(")", "after COUNT( (COUNT() takes no argument)")
                count = self.alias() or COUNT_DEFAULT_NAME
            else:
                projections.append(self.projection())
            if count is not None and projections:
                raise _refuse("COUNT() cannot be combined with other selections (GROUP BY is not supported)",
                              start.pos)
            if not self.is_symbol(","):
                break
            self.next()
            if count is not None:
                raise _refuse("COUNT() cannot be combined with other selections (GROUP BY is not supported)",
                              self.peek().pos)
        names = [p.name for p in projections]
        for name in names:
            if names.count(name) > 1:
                raise _refuse(f"two selections are named {name!r}: rename one with AS")
        return False, count, tuple(projections)

    def projection(self) -> Projection:
        token = self.peek()
        if token.kind == "ident" and self.is_symbol("(", ahead=1):
            name = token.text.upper()
            if name in AGGREGATES:
                raise _refuse(f"aggregate {name}() is not supported; only COUNT() is", token.pos)
            raise _refuse(f"function {token.text}() is not supported in SELECT", token.pos)
        if self.is_symbol("*"):
            raise _refuse("* cannot be combined with other selections", token.pos)
        path = self.path("in the selection")
        return Projection(path, self.alias() or path.names[-1])

    def alias(self) -> str | None:
        if not self.is_word("AS"):
            return None
        self.next()
        token = self.next()
        if token.kind != "ident" or token.text.upper() in RESERVED:
            raise _refuse(f"expected a name after AS, found {token.describe()}", token.pos)
        return token.text

    def collection(self) -> None:
        token = self.next()
        if token.kind != "ident":
            raise _refuse(f"expected a collection after FROM, found {token.describe()}", token.pos)
        name = token.text
        while self.is_symbol("."):
            self.next()
            part = self.next()
            if part.kind != "ident":  # a quoted name here was echoed raw, NULs and all, into the refusal
                raise _refuse(f"expected a collection name after '{name}.', found {part.describe()}", part.pos)
            name += "." + part.text
        if name.lower() != "devices":
            raise _refuse(f"FROM {name} is not supported; only FROM devices", token.pos)

    def end(self, after_condition: bool) -> None:
        token = self.peek()
        if token.kind == "end":
            return
        if self.is_word("GROUP", "ORDER") and self.is_word("BY", ahead=1):
            extra = " (results come in device id order)" if token.text.upper() == "ORDER" else ""
            raise _refuse(f"{token.text.upper()} BY is not supported{extra}", token.pos)
        if self.is_word("JOIN"):
            raise _refuse("JOIN is not supported", token.pos)
        expected = "AND, OR or the end of the query" if after_condition else "WHERE or the end of the query"
        raise _refuse(f"unexpected {token.describe()}; expected {expected}", token.pos)

    # ---- conditions: OR binds loosest, then AND, then NOT ----
    def disjunction(self) -> Condition:
        parts = [self.conjunction()]
        while self.is_word("OR"):
            self.next()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def conjunction(self) -> Condition:
        parts = [self.negation()]
        while self.is_word("AND"):
            self.next()
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def nested(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _refuse(f"the condition is nested more than {MAX_NESTING} levels deep", token.pos)

    def negation(self) -> Condition:
        if not self.is_word("NOT"):
            return self.primary()
        self.nested(self.next())
        inner = self.negation()
        self.depth -= 1
        return Not(inner)

    def primary(self) -> Condition:
        token = self.peek()
        if self.is_symbol("("):
            self.nested(self.next())
            inner = self.disjunction()
            self.expect_symbol(")", "to close the parenthesis")
            self.depth -= 1
            return inner
        if token.kind == "ident" and token.text.upper() not in RESERVED and self.is_symbol("(", ahead=1):
            return self.function()
        return self.predicate(self.operand())

    def predicate(self, left: Operand) -> Condition:
        token = self.peek()
        if token.kind == "symbol" and token.text in COMPARISONS:
            self.next()
            return Comparison(left, COMPARISONS[token.text], self.operand())
        if self.is_word("IN", "NIN"):
            self.next()
            return Membership(left, self.literal_list(), token.text.upper() == "NIN")
        if self.is_word("NOT") and self.is_word("IN", ahead=1):
            self.next()
            self.next()
            return Membership(left, self.literal_list(), True)
        if self.is_symbol("+", "-", "*", "/", "%"):
            raise _refuse(f"arithmetic ('{token.text}') is not supported", token.pos)
        if self.is_word("IS"):
            raise _refuse("IS is not supported; use IS_NULL(path) or IS_DEFINED(path)", token.pos)
        if self.is_word("LIKE", "BETWEEN"):
            raise _refuse(f"{token.text.upper()} is not supported", token.pos)
        subject = str(left) if isinstance(left, Path) else json.dumps(left.value)
        raise _refuse(f"expected a comparison (=, !=, <>, <, <=, >, >=), IN or NIN after {subject}, "
                      f"found {token.describe()}", token.pos)

    def function(self) -> Condition:
        token = self.next()
        name = token.text.upper()
        self.next()  # (
        if name in TYPE_CHECKS:
            path = self.path(f"in {name}()")
            self.expect_symbol(")", f"after {name}()'s one argument, a property path")
            return TypeCheck(name, path)
        if name in STRING_FUNCTIONS:
            path = self.path(f"in {name}()")
            self.expect_symbol(",", f"in {name}(path, 'text')")
            text = self.next()
            if text.kind != "string":
                raise _refuse(f"{name}() needs a string as its second argument, found {text.describe()}", text.pos)
            self.expect_symbol(")", f"after {name}()'s two arguments")
            return StringMatch(name, path, text.text)
        supported = ", ".join([*TYPE_CHECKS, *STRING_FUNCTIONS])
        raise _refuse(f"function {token.text}() is not supported (supported: {supported})", token.pos)

    def operand(self) -> Operand:
        token = self.peek()
        if token.kind in ("string", "number"):
            self.next()
            return Literal(token.value)
        if self.is_symbol("-") and self.peek(1).kind == "number":
            self.next()
            return Literal(-self.next().value)
        if self.is_word(*_LITERAL_WORDS):
            self.next()
            return Literal(_LITERAL_WORDS[token.text.upper()])
        if self.is_symbol("[", "{"):
            raise _refuse("arrays and objects are not supported as values (only with IN)", token.pos)
        return self.path("in the condition")

    def literal_list(self) -> tuple[str | int | float | bool | None, ...]:
        opening = self.peek()
        if not self.is_symbol("[", "("):
            raise _refuse(f"expected a list [value, ...] after IN, found {opening.describe()}", opening.pos)
        self.next()
        closing = "]" if opening.text == "[" else ")"
        values: list[str | int | float | bool | None] = []
        while True:
            value = self.operand()
            if not isinstance(value, Literal):
                raise _refuse(f"IN lists hold values, not property paths ({value})", opening.pos)
            values.append(value.value)
            if not self.is_symbol(","):
                break
            self.next()
        self.expect_symbol(closing, "to close the IN list")
        return tuple(values)

    def path(self, where: str) -> Path:
        token = self.next()
        if token.kind != "ident" or token.text.upper() in RESERVED:
            raise _refuse(f"expected a property path {where}, found {token.describe()}", token.pos)
        names = [token.text]
        while self.is_symbol(".", "["):
            if self.next().text == ".":
                name = self.next()
                if name.kind != "ident":
                    raise _refuse(f"expected a property name after '.', found {name.describe()} (write ['name'] "
                                  "for other names)", name.pos)
                names.append(name.text)
                continue
            name = self.next()
            if name.kind != "string":
                raise _refuse(f"expected a quoted property name in [...], found {name.describe()} (array indexes "
                              "are not supported)", name.pos)
            names.append(name.text)
            self.expect_symbol("]", "after the property name")
        return Path(tuple(names))


def parse_query(text: object) -> Query:
    """Parse an IoT Hub query of the supported subset; anything else is InvalidInput naming what is refused."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("query: the query text is empty (e.g. SELECT * FROM devices)")
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidInput(f"query: longer than {MAX_QUERY_LENGTH} characters")
    return _Parser(text).query(text)


# ---------------------------------------------------------------- continuation


def continuation_token(query: Query, after: str, returned: int) -> str:
    """An opaque token: the query it belongs to, the last device key returned and how many rows were returned."""
    raw = json.dumps({"q": query.fingerprint, "a": after, "n": returned}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def read_continuation(query: Query, token: str) -> tuple[str, int]:
    """(device key to continue after, rows already returned) from a token :func:`continuation_token` made."""
    try:  # parse_json: a made-up token nested deep is a refusal, not json's RecursionError (a 500)
        data = parse_json(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), "x-ms-continuation")
    except (InvalidInput, ValueError, binascii.Error):
        data = None
    after = data.get("a") if isinstance(data, dict) else None
    # the key is bound in a comparison: a NUL in it is PostgreSQL's DataError (a 500), so it is a device key or nothing
    if (not isinstance(after, str) or len(after) > MAX_KEY_LENGTH or not after.isprintable()
            or not isinstance(data.get("n"), int) or isinstance(data.get("n"), bool) or data["n"] < 0):
        raise InvalidInput("x-ms-continuation is not a continuation token this service gave")
    if data.get("q") != query.fingerprint:
        raise InvalidInput("x-ms-continuation belongs to another query: send it with the same query text")
    return after, data["n"]

"""The bank-account aggregate in Python: the same contract, commands, events, state and
rejections as the Rust example in `plugins/bank-account`.

Build the component (from the repository root) and try it on a running Meridian:

    bash plugins/build.sh    # or, by hand:
    componentize-py -d guest-sdk/wit-0.1.0 -w aggregate componentize \
        -p plugins/bank-account-py bank_account -o bank_account_py.wasm
    meridian plugin upload bank-account bank_account_py.wasm

Commands: {"type":"Open","owner":"alice"}, {"type":"Deposit","amount":10},
{"type":"Withdraw","amount":5}. Events: Opened {owner}, Deposited {amount},
Withdrawn {amount}. State: {"owner":"alice","balance":5,"open":true}.

Amounts and the balance are 64-bit signed integers, as in the Rust aggregate: a number
with a fraction or exponent, or one outside that range, is not an amount.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Description, Event, Rejection

AGGREGATE_TYPE = "bank-account"
SCHEMA_VERSION = 1

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

# The characters Rust's `char::is_whitespace` (Unicode White_Space) accepts, so that
# "owner must not be blank" means the same in every language.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
) + "\u2028\u2029\u202f\u205f\u3000"


class Invalid(Exception):
    """Input that does not decode; the message says why, like serde's would."""


# --- JSON in and out -------------------------------------------------------------


def _no_constants(name):
    # Python's json accepts NaN and Infinity; JSON (and serde_json) does not.
    raise Invalid(f"expected value, got `{name}`")


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise Invalid(f"duplicate field `{key}`")
        obj[key] = value
    return obj


def parse_json(data):
    """Parses UTF-8 JSON bytes strictly: no NaN/Infinity, no duplicate keys."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as error:
        raise Invalid(f"invalid UTF-8: {error.reason}") from None
    if not text.strip(" \t\n\r"):
        raise Invalid("EOF while parsing a value")
    try:
        return json.loads(
            text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates
        )
    except Invalid:
        raise
    except (ValueError, RecursionError) as error:
        raise Invalid(str(error)) from None


def to_json(value):
    """Compact JSON with non-ASCII kept as is: the bytes serde_json writes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def describe_value(value):
    """How serde names an unexpected JSON value in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "a sequence"
    return "a map"


def field(obj, name, kind):
    """Reads a required field of `kind` ("string", "i64" or "bool") from `obj`."""
    if name not in obj:
        raise Invalid(f"missing field `{name}`")
    value = obj[name]
    if kind == "string":
        if not isinstance(value, str):
            raise Invalid(f"invalid type: {describe_value(value)}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid(f"field `{name}` is not valid Unicode (a lone surrogate)") from None
    elif kind == "i64":
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"invalid type: {describe_value(value)}, expected i64")
        if not I64_MIN <= value <= I64_MAX:
            raise Invalid(f"invalid value: integer `{value}`, expected i64")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise Invalid(f"invalid type: {describe_value(value)}, expected a boolean")
    return value


# --- State ---------------------------------------------------------------------


def decode_state(data):
    """Empty bytes are the state before any event."""
    if len(data) == 0:
        return {"owner": "", "balance": 0, "open": False}
    try:
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise Invalid(f"invalid type: {describe_value(obj)}, expected struct State")
        return {
            "owner": field(obj, "owner", "string"),
            "balance": field(obj, "balance", "i64"),
            "open": field(obj, "open", "bool"),
        }
    except Invalid as error:
        raise Invalid(f"invalid state: {error}") from None


def encode_state(state):
    # Field order is part of the contract: {"owner","balance","open"}.
    return to_json(
        {"owner": state["owner"], "balance": state["balance"], "open": state["open"]}
    )


# --- Commands ------------------------------------------------------------------

COMMANDS = {"Open": "owner", "Deposit": "amount", "Withdraw": "amount"}


def decode_command(data):
    """Returns (type, argument) for a command tagged by `type`."""
    try:
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise Invalid(
                f"invalid type: {describe_value(obj)}, expected internally tagged enum Command"
            )
        kind = field(obj, "type", "string")
        if kind not in COMMANDS:
            raise Invalid(
                f"unknown variant `{kind}`, expected one of `Open`, `Deposit`, `Withdraw`"
            )
        name = COMMANDS[kind]
        return kind, field(obj, name, "string" if name == "owner" else "i64")
    except Invalid as error:
        raise Invalid(f"invalid command: {error}") from None


def decide(state, kind, argument):
    """The business rules; returns the events as (type, payload) pairs or raises Reject."""
    if kind == "Open":
        if state["open"]:
            raise Reject("account is already open")
        if not argument.strip(WHITESPACE):
            raise Reject("owner must not be empty")
        return [("Opened", {"owner": argument})]
    amount = argument
    if not state["open"]:
        raise Reject("account is not open")
    if amount <= 0:
        raise Reject(f"amount must be positive, got {amount}")
    balance = state["balance"]
    if kind == "Deposit":
        if balance + amount > I64_MAX:
            raise Reject(f"balance would overflow: balance {balance}, deposit {amount}")
        return [("Deposited", {"amount": amount})]
    if amount > balance:
        raise Reject(f"insufficient funds: balance {balance}, withdrawal {amount}")
    return [("Withdrawn", {"amount": amount})]


class Reject(Exception):
    """A command the account refuses; the message goes to the caller as is."""


# --- Events --------------------------------------------------------------------

EVENTS = {"Opened": ("owner", "string"), "Deposited": ("amount", "i64"), "Withdrawn": ("amount", "i64")}


def evolve(state, event_type, payload):
    """Folds one event into the state. Events are facts: only undecodable ones fail."""
    if event_type not in EVENTS:
        raise Invalid(
            f"unknown variant `{event_type}`, expected one of `Opened`, `Deposited`, `Withdrawn`"
        )
    try:
        body = parse_json(payload)
    except Invalid as error:
        raise Invalid(f"invalid payload for event `{event_type}`: {error}") from None
    try:
        if not isinstance(body, dict):
            raise Invalid(
                f"invalid type: {describe_value(body)}, expected struct variant Event::{event_type}"
            )
        name, kind = EVENTS[event_type]
        value = field(body, name, kind)
    except Invalid as error:
        raise Invalid(f"invalid event `{event_type}`: {error}") from None
    if event_type == "Opened":
        state["owner"] = value
        state["open"] = True
    elif event_type == "Deposited":
        # Saturating, as in Rust: `handle` rules overflow out, and a failure while
        # replaying history would make the account unloadable.
        state["balance"] = min(I64_MAX, state["balance"] + value)
    else:
        state["balance"] = max(I64_MIN, state["balance"] - value)
    return state


# --- The component's exports ---------------------------------------------------


class WitWorld(wit_world.WitWorld):
    """The `aggregate` world of `meridian:aggregate@0.1.0`."""

    def describe(self) -> Description:
        return Description(aggregate_type=AGGREGATE_TYPE, schema_version=SCHEMA_VERSION)

    def handle(self, state: bytes, command: bytes) -> list[Event]:
        try:
            current = decode_state(state)
            kind, argument = decode_command(command)
            events = decide(current, kind, argument)
        except (Invalid, Reject) as error:
            raise Err(Rejection(message=str(error))) from None
        return [Event(event_type=name, payload=to_json(body)) for name, body in events]

    def apply(self, state: bytes, event: Event) -> bytes:
        try:
            current = decode_state(state)
            return encode_state(evolve(current, event.event_type, event.payload))
        except Invalid as error:
            raise Err(str(error)) from None

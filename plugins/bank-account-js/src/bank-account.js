// The bank-account aggregate in JavaScript: the same contract, commands, events, state
// and rejections as the Rust example in `plugins/bank-account`.
//
// Build the component (from the repository root) and try it on a running Meridian:
//
//   bash plugins/build.sh        # or: cd plugins/bank-account-js && npm ci && node build.mjs
//   meridian plugin upload bank-account target/wasm32-wasip2/release/bank_account_js.wasm
//
// Commands: {"type":"Open","owner":"alice"}, {"type":"Deposit","amount":10},
// {"type":"Withdraw","amount":5}. Events: Opened {owner}, Deposited {amount},
// Withdrawn {amount}. State: {"owner":"alice","balance":5,"open":true}.
//
// Amounts and the balance are 64-bit signed integers, as in the Rust aggregate. A JS
// number is exact only up to 2^53, so this file reads JSON with its own small parser
// that turns integer literals into BigInt, and writes JSON with BigInts as digits.

const AGGREGATE_TYPE = 'bank-account';
const SCHEMA_VERSION = 1;

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

// The characters Rust's `char::is_whitespace` (Unicode White_Space) accepts, so that
// "owner must not be blank" means the same in every language. (`String.prototype.trim`
// also strips U+FEFF, which Rust does not.)
const WHITESPACE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

/** Input that does not decode; the message says why, like serde's would. */
class Invalid extends Error {}

/** A command the account refuses; the message goes to the caller as is. */
class Reject extends Error {}

// --- JSON in and out -------------------------------------------------------------

const utf8 = new TextDecoder('utf-8', { fatal: true });
const encoder = new TextEncoder();

/** Parses UTF-8 JSON bytes strictly; integers become BigInt, duplicate keys fail. */
function parseJson(bytes) {
  let text;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw new Invalid('invalid UTF-8');
  }
  return parseFast(text) ?? parseExact(text);
}

// Objects become Maps so that a parsed value never collides with prototype keys.
const toMaps = (value) => {
  if (Array.isArray(value)) return value.map(toMaps);
  if (value !== null && typeof value === 'object') {
    return new Map(Object.entries(value).map(([k, v]) => [k, toMaps(v)]));
  }
  return Number.isInteger(value) ? BigInt(value) : value;
};

/**
 * The engine's own JSON.parse, which is many times faster than `parseExact` in an
 * interpreter, used only where its result is provably the same: every number literal
 * is an integer that a double holds exactly, no key repeats, and nesting is shallow.
 * Returns undefined when that cannot be shown cheaply; `parseExact` then decides.
 */
function parseFast(text) {
  // A digit followed by `.`, `e` or `E` may be a float literal (or just text inside a
  // string; either way the exact parser decides).
  if (/[0-9][.eE]/.test(text)) return undefined;
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  let keys = 0;
  let exact = true;
  let depth = 0;
  const walk = (v, level) => {
    depth = Math.max(depth, level);
    if (typeof v === 'number') {
      exact &&= Number.isSafeInteger(v);
    } else if (Array.isArray(v)) {
      v.forEach((item) => walk(item, level + 1));
    } else if (v !== null && typeof v === 'object') {
      for (const key in v) {
        keys++;
        walk(v[key], level + 1);
      }
    }
  };
  walk(value, 0);
  // JSON.parse keeps the last of repeated keys silently: if fewer keys came out than
  // `"…":` pairs went in, one repeated. (A string containing `":` only sends the input
  // to the exact parser.)
  const pairs = text.match(/"\s*:/g)?.length ?? 0;
  if (!exact || depth > 100 || pairs !== keys) return undefined;
  return toMaps(value);
}

/** A JSON parser that keeps integers exact (BigInt) and refuses repeated keys. */
function parseExact(text) {
  let at = 0;
  const fail = (what) => {
    throw new Invalid(`${what} at offset ${at}`);
  };
  const space = () => {
    while (at < text.length && ' \t\n\r'.includes(text[at])) at++;
  };
  const value = (depth) => {
    if (depth > 128) fail('recursion limit exceeded');
    space();
    if (at >= text.length) fail('EOF while parsing a value');
    const c = text[at];
    if (c === '{') {
      at++;
      const object = new Map();
      space();
      if (text[at] === '}') {
        at++;
        return object;
      }
      for (;;) {
        space();
        if (text[at] !== '"') fail('key must be a string');
        const key = string();
        if (object.has(key)) throw new Invalid(`duplicate field \`${key}\``);
        space();
        if (text[at] !== ':') fail('expected `:`');
        at++;
        object.set(key, value(depth + 1));
        space();
        if (text[at] === ',') {
          at++;
        } else if (text[at] === '}') {
          at++;
          return object;
        } else {
          fail('expected `,` or `}`');
        }
      }
    }
    if (c === '[') {
      at++;
      const array = [];
      space();
      if (text[at] === ']') {
        at++;
        return array;
      }
      for (;;) {
        array.push(value(depth + 1));
        space();
        if (text[at] === ',') {
          at++;
        } else if (text[at] === ']') {
          at++;
          return array;
        } else {
          fail('expected `,` or `]`');
        }
      }
    }
    if (c === '"') return string();
    for (const [word, result] of [['true', true], ['false', false], ['null', null]]) {
      if (text.startsWith(word, at)) {
        at += word.length;
        return result;
      }
    }
    const number = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(at, at + 400));
    if (!number) fail('expected value');
    at += number[0].length;
    // An integer literal is an integer; anything with a fraction or exponent is a
    // float, as serde_json sees it (so `10.0` is not an amount).
    return number[2] === undefined && number[3] === undefined
      ? BigInt(number[0])
      : Number(number[0]);
  };
  const string = () => {
    at++;
    let out = '';
    for (;;) {
      if (at >= text.length) fail('EOF while parsing a string');
      const c = text[at];
      if (c === '"') {
        at++;
        return out;
      }
      if (c < ' ') fail('control character in string');
      if (c !== '\\') {
        out += c;
        at++;
        continue;
      }
      const e = text[at + 1];
      const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
      if (e in simple) {
        out += simple[e];
        at += 2;
      } else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(text.slice(at + 2, at + 6))) {
        out += String.fromCharCode(parseInt(text.slice(at + 2, at + 6), 16));
        at += 6;
      } else {
        fail('invalid escape');
      }
    }
  };
  const result = value(0);
  space();
  if (at < text.length) fail('trailing characters');
  return result;
}

/** Compact JSON, BigInt as digits, key order kept: the bytes serde_json writes. */
function toJson(value) {
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Map) {
    const fields = [...value].map(([k, v]) => `${JSON.stringify(k)}:${toJson(v)}`);
    return `{${fields.join(',')}}`;
  }
  return JSON.stringify(value);
}

const encode = (value) => encoder.encode(toJson(value));

/** How serde names an unexpected JSON value in its messages. */
function describeValue(value) {
  if (value === null) return 'null';
  if (typeof value === 'boolean') return `boolean \`${value}\``;
  if (typeof value === 'bigint') return `integer \`${value}\``;
  if (typeof value === 'number') return `floating point \`${Number.isInteger(value) ? value.toFixed(1) : value}\``;
  if (typeof value === 'string') return `string ${JSON.stringify(value)}`;
  if (Array.isArray(value)) return 'a sequence';
  return 'a map';
}

/** Reads a required field of `kind` ('string', 'i64' or 'bool') from a parsed object. */
function field(object, name, kind) {
  if (!object.has(name)) throw new Invalid(`missing field \`${name}\``);
  const value = object.get(name);
  if (kind === 'string') {
    if (typeof value !== 'string') {
      throw new Invalid(`invalid type: ${describeValue(value)}, expected a string`);
    }
    if (!value.isWellFormed()) {
      throw new Invalid(`field \`${name}\` is not valid Unicode (a lone surrogate)`);
    }
  } else if (kind === 'i64') {
    if (typeof value !== 'bigint') {
      throw new Invalid(`invalid type: ${describeValue(value)}, expected i64`);
    }
    if (value < I64_MIN || value > I64_MAX) {
      throw new Invalid(`invalid value: integer \`${value}\`, expected i64`);
    }
  } else if (typeof value !== 'boolean') {
    throw new Invalid(`invalid type: ${describeValue(value)}, expected a boolean`);
  }
  return value;
}

const isObject = (value) => value instanceof Map;

// --- State ---------------------------------------------------------------------

/** Empty bytes are the state before any event. */
function decodeState(bytes) {
  if (bytes.length === 0) return { owner: '', balance: 0n, open: false };
  try {
    const object = parseJson(bytes);
    if (!isObject(object)) {
      throw new Invalid(`invalid type: ${describeValue(object)}, expected struct State`);
    }
    return {
      owner: field(object, 'owner', 'string'),
      balance: field(object, 'balance', 'i64'),
      open: field(object, 'open', 'bool'),
    };
  } catch (error) {
    if (error instanceof Invalid) throw new Invalid(`invalid state: ${error.message}`);
    throw error;
  }
}

/** Field order is part of the contract: {"owner","balance","open"}. */
const encodeState = (state) =>
  encode(new Map([['owner', state.owner], ['balance', state.balance], ['open', state.open]]));

// --- Commands ------------------------------------------------------------------

const COMMANDS = { Open: ['owner', 'string'], Deposit: ['amount', 'i64'], Withdraw: ['amount', 'i64'] };

/** Returns [type, argument] for a command tagged by `type`. */
function decodeCommand(bytes) {
  try {
    const object = parseJson(bytes);
    if (!isObject(object)) {
      throw new Invalid(`invalid type: ${describeValue(object)}, expected internally tagged enum Command`);
    }
    const type = field(object, 'type', 'string');
    if (!Object.hasOwn(COMMANDS, type)) {
      throw new Invalid(`unknown variant \`${type}\`, expected one of \`Open\`, \`Deposit\`, \`Withdraw\``);
    }
    const [name, kind] = COMMANDS[type];
    return [type, field(object, name, kind)];
  } catch (error) {
    if (error instanceof Invalid) throw new Invalid(`invalid command: ${error.message}`);
    throw error;
  }
}

/** The business rules: the events as [type, payload] pairs, or a Reject. */
function decide(state, type, argument) {
  if (type === 'Open') {
    if (state.open) throw new Reject('account is already open');
    if (WHITESPACE.test(argument)) throw new Reject('owner must not be empty');
    return [['Opened', new Map([['owner', argument]])]];
  }
  const amount = argument;
  if (!state.open) throw new Reject('account is not open');
  if (amount <= 0n) throw new Reject(`amount must be positive, got ${amount}`);
  const { balance } = state;
  if (type === 'Deposit') {
    if (balance + amount > I64_MAX) {
      throw new Reject(`balance would overflow: balance ${balance}, deposit ${amount}`);
    }
    return [['Deposited', new Map([['amount', amount]])]];
  }
  if (amount > balance) {
    throw new Reject(`insufficient funds: balance ${balance}, withdrawal ${amount}`);
  }
  return [['Withdrawn', new Map([['amount', amount]])]];
}

// --- Events --------------------------------------------------------------------

const EVENTS = { Opened: ['owner', 'string'], Deposited: ['amount', 'i64'], Withdrawn: ['amount', 'i64'] };

/** Folds one event into the state. Events are facts: only undecodable ones fail. */
function evolve(state, eventType, payload) {
  if (!Object.hasOwn(EVENTS, eventType)) {
    throw new Invalid(
      `unknown variant \`${eventType}\`, expected one of \`Opened\`, \`Deposited\`, \`Withdrawn\``,
    );
  }
  let body;
  try {
    body = parseJson(payload);
  } catch (error) {
    if (error instanceof Invalid) {
      throw new Invalid(`invalid payload for event \`${eventType}\`: ${error.message}`);
    }
    throw error;
  }
  let value;
  try {
    if (!isObject(body)) {
      throw new Invalid(`invalid type: ${describeValue(body)}, expected struct variant Event::${eventType}`);
    }
    const [name, kind] = EVENTS[eventType];
    value = field(body, name, kind);
  } catch (error) {
    if (error instanceof Invalid) throw new Invalid(`invalid event \`${eventType}\`: ${error.message}`);
    throw error;
  }
  // Saturating, as in Rust: `handle` rules overflow out, and a failure while replaying
  // history would make the account unloadable.
  if (eventType === 'Opened') {
    return { ...state, owner: value, open: true };
  }
  const balance = eventType === 'Deposited' ? state.balance + value : state.balance - value;
  return { ...state, balance: balance > I64_MAX ? I64_MAX : balance < I64_MIN ? I64_MIN : balance };
}

// --- The component's exports ---------------------------------------------------
//
// componentize-js maps the world's exports to this module's exports (kebab-case names
// become camelCase). For a `result`, returning is `ok`; throwing an object with a
// `payload` property is `err` with that payload.

/** `describe`: the aggregate type and schema version. */
export function describe() {
  return { aggregateType: AGGREGATE_TYPE, schemaVersion: SCHEMA_VERSION };
}

/** `handle`: decides the events for a command, or rejects it. */
export function handle(state, command) {
  let events;
  try {
    events = decide(decodeState(state), ...decodeCommand(command));
  } catch (error) {
    if (error instanceof Invalid || error instanceof Reject) {
      throw { payload: { message: error.message } };
    }
    throw error;
  }
  return events.map(([eventType, body]) => ({ eventType, payload: encode(body) }));
}

/** `apply`: folds one event into the state and returns the new state. */
export function apply(state, event) {
  try {
    return encodeState(evolve(decodeState(state), event.eventType, event.payload));
  } catch (error) {
    if (error instanceof Invalid) throw { payload: error.message };
    throw error;
  }
}

/**
 * Building blocks for what untrusted callers send: text that is bounded and cannot disguise itself,
 * numbers in paths and queries that mean one thing, environment maps, labels and URLs. Members of
 * many organizations call the same API, and what one of them writes is read by others: in the
 * dashboard, in `devyard` output, in audit entries and in terminals. Every request schema builds
 * its free text from these, so the rules are the same everywhere and documented in OpenAPI.
 */
import { z } from 'zod';

/**
 * Characters no name or label carries: C0 controls (CR and LF among them), DEL and C1 controls, the
 * bidirectional embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069) that make text
 * display in another order than it is read by programs, and the Unicode line and paragraph
 * separators, which some terminals and editors break lines at.
 */
const INLINE_UNSAFE = '\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069';
/** The same, but tab and line feed are allowed: descriptions and shell scripts span lines. */
const MULTILINE_UNSAFE = '\\u0000-\\u0008\\u000b-\\u001f\\u007f-\\u009f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069';

const INLINE_PATTERN = new RegExp(`^[^${INLINE_UNSAFE}]*$`);
const MULTILINE_PATTERN = new RegExp(`^[^${MULTILINE_UNSAFE}]*$`);
const INLINE_UNSAFE_CHAR = new RegExp(`[${INLINE_UNSAFE}]|\\p{Cs}`, 'u');

const INLINE_MESSAGE = 'must not contain control characters, line breaks or bidirectional overrides';
const MULTILINE_MESSAGE = 'must not contain control characters (other than tab and line feed) or bidirectional overrides';

/** A lone UTF-16 surrogate is not text: it cannot be encoded as UTF-8 and is stored mangled. */
const wellFormed = (s: string) => !/\p{Cs}/u.test(s);

/** UTF-8 length without Buffer: the web UI uses these schemas in the browser. */
export function utf8Length(s: string): number {
  return new TextEncoder().encode(s).length;
}

/** Whether text may be shown as one line as it is: no controls, line breaks, bidi overrides or lone surrogates. */
export function isInlineText(s: string): boolean {
  return !INLINE_UNSAFE_CHAR.test(s);
}

const INLINE_UNSAFE_CHARS = new RegExp(`[${INLINE_UNSAFE}]|\\p{Cs}`, 'gu');

/**
 * Text with every character a name may not carry shown as a `\uXXXX` escape: for quoting what a
 * caller sent (in an error, a log line) so it reads as what it is, not as what it pretends to be.
 */
export function escapeUnsafeText(s: string): string {
  return s.replace(INLINE_UNSAFE_CHARS, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/**
 * Text shown on one line, as it is: names, labels, titles. The limit counts UTF-16 units (a
 * JavaScript string's length); for emoji and other text beyond the Basic Multilingual Plane that
 * is stricter than the maxLength of the OpenAPI document, which counts code points.
 */
export function inlineText(max: number, min = 1) {
  return z
    .string()
    .min(min)
    .max(max)
    .regex(INLINE_PATTERN, INLINE_MESSAGE)
    .refine(wellFormed, { message: 'must be well-formed Unicode (no lone surrogates)' });
}

/** Text that may span lines (descriptions, shell commands): tab and line feed allowed, nothing else of the above. */
export function multilineText(max: number, min = 0) {
  return z
    .string()
    .min(min)
    .max(max)
    .regex(MULTILINE_PATTERN, MULTILINE_MESSAGE)
    .refine(wellFormed, { message: 'must be well-formed Unicode (no lone surrogates)' });
}

const MULTILINE_UNSAFE_CHARS = new RegExp(`[${MULTILINE_UNSAFE}]|\\p{Cs}`, 'gu');

/**
 * Text a node agent observed and reports (an error, a progress line, a build log line): bounded,
 * and with controls, bidi overrides and lone surrogates replaced by U+FFFD rather than refused.
 * It is program output (escape sequences of a build tool included) that users read in events and
 * `devyard` output, and refusing it would refuse the whole report, phases and all.
 */
export function reportedText(max: number) {
  return z
    .string()
    .max(max)
    .transform((s) => s.replace(MULTILINE_UNSAFE_CHARS, '\uFFFD'))
    .meta({ description: `at most ${max} characters; control characters other than tab and line feed, and bidirectional overrides, are stored as U+FFFD` });
}

/**
 * A non-negative integer in a path segment or query parameter: decimal digits only, no sign, no
 * leading zero, no exponent, no spaces, within [min, max]. `Number()` and zod's coercion read
 * `0x1F` as 31, `1e1` as 10 and ` 22` as 22; a URL that means one thing to the server and another
 * to a proxy, a log reader or an authorization rule is how filters are bypassed.
 */
export function decimalInteger(min: number, max: number) {
  // 15 digits stay within the safe integer range, so Number() below is exact.
  return z
    .string()
    .regex(/^(0|[1-9][0-9]{0,14})$/, 'must be a decimal integer (digits only)')
    .transform(Number)
    .pipe(z.number().int().min(min).max(max))
    .meta({ description: `decimal integer ${min}–${max}` });
}

/** Most variables in one environment map (a template's or a box's). */
export const MAX_ENV_VARS = 256;
/** Longest variable name. */
export const MAX_ENV_NAME_LENGTH = 128;
/** Largest value, in UTF-8 bytes; Linux refuses a single argument or variable over 128 KiB anyway. */
export const MAX_ENV_VALUE_BYTES = 32 * 1024;

const ENV_NAME_MESSAGE = `environment variable names are letters, digits and _, not starting with a digit, at most ${MAX_ENV_NAME_LENGTH} characters`;

/**
 * Environment variables of a box or template. Values are any text but NUL (an environment cannot
 * carry it); they are bounded so a map cannot be used to store megabytes per box.
 */
export const EnvSchema = z
  .record(
    z.string().regex(new RegExp(`^[A-Za-z_][A-Za-z0-9_]{0,${MAX_ENV_NAME_LENGTH - 1}}$`), ENV_NAME_MESSAGE),
    z
      .string()
      .refine((v) => utf8Length(v) <= MAX_ENV_VALUE_BYTES, { message: `must be at most ${MAX_ENV_VALUE_BYTES} bytes (UTF-8)` })
      .refine((v) => !v.includes('\0'), { message: 'must not contain a NUL character' }),
    // zod reports a bad record key as a bare "Invalid key in record".
    { error: (iss) => (iss.code === 'invalid_key' ? ENV_NAME_MESSAGE : undefined) },
  )
  .refine((env) => Object.keys(env).length <= MAX_ENV_VARS, { message: `at most ${MAX_ENV_VARS} variables` })
  .meta({
    description: `at most ${MAX_ENV_VARS} variables; names [A-Za-z_][A-Za-z0-9_]* up to ${MAX_ENV_NAME_LENGTH} characters; values up to ${MAX_ENV_VALUE_BYTES / 1024} KiB (UTF-8), without NUL`,
    maxProperties: MAX_ENV_VARS,
  });

/** Most labels a node may carry. */
export const MAX_LABELS = 64;
const LABEL_KEY = /^[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$/;
const LABEL_KEY_MESSAGE = 'label keys are letters, digits and . _ / -, starting and ending with a letter or digit, at most 128 characters';

/** Key/value labels (`microvm.accel: kvm`): keys of a fixed charset, values one line of text. */
export const LabelsSchema = z
  .record(z.string().regex(LABEL_KEY, LABEL_KEY_MESSAGE), inlineText(256, 0), {
    error: (iss) => (iss.code === 'invalid_key' ? LABEL_KEY_MESSAGE : undefined),
  })
  .refine((l) => Object.keys(l).length <= MAX_LABELS, { message: `at most ${MAX_LABELS} labels` })
  .meta({ description: `at most ${MAX_LABELS} labels; values up to 256 characters`, maxProperties: MAX_LABELS });

/**
 * An identifier in a path (a node, token, key, invitation or box id, or an SSH key fingerprint
 * such as `SHA256:…`): a fixed ASCII charset, so an id is the same string in a URL, a log line and
 * an audit entry.
 */
export const IdParamSchema = z
  .string()
  .regex(/^[A-Za-z0-9._:+/=-]{1,64}$/, 'must be an id: 1–64 letters, digits and . _ : + / = -')
  .meta({ description: 'an id: 1–64 letters, digits and . _ : + / = -' });

/**
 * An http(s) base URL the server hands to others (agents, gateways, CLIs): any other scheme would
 * make the server point clients at local files or other protocols, credentials in it would be
 * shown to every user, and a query or fragment would be cut off by the paths appended to it.
 */
export function httpBaseUrl(max = 2048) {
  return z
    .url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' })
    .max(max)
    .refine(
      (v) => {
        // zod runs every check, this one too when the value is no URL at all.
        let u: URL;
        try {
          u = new URL(v);
        } catch {
          return false;
        }
        return u.username === '' && u.password === '' && !/[?#]/.test(v) && isInlineText(v);
      },
      { message: 'must not carry credentials, a query or a fragment' },
    )
    .meta({ pattern: '^[Hh][Tt][Tt][Pp][Ss]?://[^?#]*$' });
}

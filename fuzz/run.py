"""Run the decoder fuzz target for a bounded time and report how many inputs were tried.

    python fuzz/run.py --seconds 60 [--corpus DIR] [--jobs 1]

Seeds the corpus with one webhook body of every message type, statuses, other fields and a few
broken envelopes (from tests/payloads.py), uses a dictionary of Meta's field names, and passes
libFuzzer `-max_total_time`. Exit code 0 when no input made the target fail; otherwise the
failing input is saved under the corpus directory as `crash-*` and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests import payloads  # noqa: E402

TOKENS = [
    "object",
    "whatsapp_business_account",
    "entry",
    "id",
    "changes",
    "field",
    "messages",
    "value",
    "messaging_product",
    "whatsapp",
    "metadata",
    "display_phone_number",
    "phone_number_id",
    "contacts",
    "profile",
    "name",
    "wa_id",
    "user_id",
    "from",
    "from_user_id",
    "timestamp",
    "type",
    "text",
    "body",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "interactive",
    "button",
    "reaction",
    "order",
    "system",
    "unsupported",
    "unknown",
    "context",
    "statuses",
    "status",
    "recipient_id",
    "errors",
    "code",
    "title",
    "error_data",
    "details",
    "caption",
    "mime_type",
    "sha256",
    "voice",
    "latitude",
    "longitude",
    "button_reply",
    "list_reply",
    "nfm_reply",
    "call_permission_reply",
    "response",
    "accept",
    "reject",
    "response_json",
    "edit",
    "revoke",
    "original_message_id",
    "request_welcome",
    "recipient_user_id",
    "time",
    "payload",
    "emoji",
    "message_id",
    "product_items",
    "quantity",
    "item_price",
    "delivered",
    "read",
    "failed",
    "sent",
    "played",
    "123456789012345",
    "987654321098765",
    "\\u0000",
    "\\ud800",
    "1760000000",
    "18446744073709551615",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "true",
    "false",
    '""',
    "1e400",
    "-0",
]


def seeds() -> list[bytes]:
    samples = {**payloads.SAMPLES, **payloads.SAMPLES_2025}
    msgs = [dict(m, id=f"wamid.SEED.{kind}") for kind, m in samples.items()]
    bodies = [payloads.body_of(m) for m in msgs]
    bodies.append(payloads.body_of(*msgs))
    statuses = [payloads.status("wamid.OUT", s) for s in ("sent", "delivered", "read", "failed", "played")]
    bodies.append(payloads.dump(payloads.envelope(payloads.entry(payloads.change(payloads.value(statuses=statuses))))))
    event = payloads.change({"event": "APPROVED", "message_template_id": 7}, "message_template_status_update")
    bodies.append(payloads.dump(payloads.envelope(payloads.entry(event))))
    errors = payloads.change(payloads.value(errors=[{"code": 131000, "title": "x"}]))
    bodies.append(payloads.dump(payloads.envelope(payloads.entry(errors))))
    bodies += [b"", b"{}", b'{"entry":[]}', b'{"entry":[{}]}', b"[" * 50]
    whole = [b"\x00" + body for body in bodies]  # mode byte: see fuzz_decoder.WRAPS
    items = [b"\x03" + payloads.dump(m) for m in msgs]
    items += [b"\x01" + payloads.dump(s) for s in statuses]
    items.append(b"\x05" + payloads.dump({"profile": {"name": "Ana"}, "wa_id": "1", "user_id": "US.1"}))
    return whole + items


def prepare(corpus: Path) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    for body in seeds():
        (corpus / hashlib.sha1(body).hexdigest()).write_bytes(body)  # noqa: S324 (a file name)
    dictionary = corpus.parent / "webhook.dict"
    escaped = (t.replace("\\", "\\\\").replace('"', '\\"') for t in TOKENS)
    dictionary.write_text("".join(f'"{t}"\n' for t in escaped), encoding="utf-8")
    return dictionary


def run(seconds: int, corpus: Path) -> tuple[int, int, str]:
    dictionary = prepare(corpus)
    cmd = [
        sys.executable,
        str(HERE / "fuzz_decoder.py"),
        str(corpus),
        f"-max_total_time={seconds}",
        f"-dict={dictionary}",
        "-print_final_stats=1",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={corpus}/",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 (our target)
    output = done.stdout + done.stderr
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    tried = int(executed.group(1)) if executed else 0
    return done.returncode, tried, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz alfred_bot.parse.parse_body with atheris for a bounded time.")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--corpus", type=Path, help="corpus directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alfred-fuzz-") as tmp:
        corpus = args.corpus or Path(tmp) / "corpus"
        code, tried, output = run(args.seconds, corpus)
    coverage = re.findall(r"cov: (\d+)", output)
    print(f"fuzz_decoder: {tried} inputs tried in {args.seconds} s, coverage {coverage[-1] if coverage else '?'} edges")
    if code != 0:
        print(output[-4000:], file=sys.stderr)
        print(f"fuzz_decoder: FAILED (exit {code}); the input is saved in {corpus}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

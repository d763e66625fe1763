"""Record files on disk (JSON, JSONL, CSV): the one place the package writes files.

Every whole-file writer goes through a temporary file beside the target and a rename, so a killed run leaves the
old file or the new one, never half of one. Logs that grow as a run goes (a loss curve, a generation log) are
appended a line at a time and flushed; their readers drop a last line that a kill cut in half. Readers name the
file and line of anything malformed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, *, sort_keys: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a malformed line is an error naming the file and the line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error})") from error
    return records


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows as CSV; the columns are `columns`, else every key of any row in first-seen order (then rows may not be
    empty)."""
    if not rows and columns is None:
        raise ValueError(f"no rows to write to {path}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_csv(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a CSV file as dicts of strings; missing `required` columns are an error naming them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; it must have {list(required)}")
        return list(reader)


def append_jsonl(path: str | Path, records: list[dict], *, sync: bool = False) -> None:
    """Append records to a JSONL log, flushed (and with `sync`, fsynced: for logs a re-run resumes from)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def append_csv_row(path: str | Path, columns: list[str], row: dict) -> None:
    """Append one row to a CSV log with a header already written (keys outside `columns` are left out)."""
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n").writerow(row)


def read_log_lines(path: str | Path) -> list[dict]:
    """The complete records of a JSONL log; a last line half-written by a kill is cut off the file, so appends
    stay valid. A missing file has none."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return [json.loads(line) for line in raw[:end].decode("utf-8").splitlines() if line.strip()]

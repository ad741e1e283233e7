"""Drop a sample STATUS.json and its two staged dumps, as ACME's agent would.

Usage: .venv/bin/python examples/drop_sample_report.py [--config examples/backupwatch.toml]
       [--corrupt hr]   (make the hr dump's checksum wrong, to see HASH_MISMATCH)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from backupwatch.config import load_settings

AGENT = "ACME_Lyon_Part-Dieu"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("backupwatch.toml"))
    parser.add_argument("--corrupt", choices=["sales", "hr"])
    args = parser.parse_args()
    settings = load_settings(args.config, os.environ)
    site = settings.backup_storage_root / AGENT
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    databases = {}
    for name in ("sales", "hr"):
        staged = Path("database") / f"{name}.sql.gz"
        payload = gzip.compress(f"-- {name} dump taken at {now}\n".encode())
        (site / staged).parent.mkdir(parents=True, exist_ok=True)
        (site / staged).write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        if name == args.corrupt:
            digest = "0" * 64
        step = {"status": True, "timestamp": now}
        databases[name] = {
            "backup_process": {**step, "backup_process_start_time": now},
            "compress_process": {
                **step,
                "compress_process_start_time": now,
                "sha256_checksum": digest,
                "size_bytes": len(payload),
            },
            "transfer_process": {**step, "transfer_process_start_time": now, "error_message": None},
            "staged_file_name": str(staged),
            "logs_summary": "sample report",
        }
    report = {
        "agent_id": AGENT,
        "operation_start_time": now,
        "operation_timestamp": now,
        "overall_status": "completed",
        "databases": databases,
    }
    temp = site / ".STATUS.json.part"
    temp.write_text(json.dumps(report, indent=2))
    os.rename(temp, site / "STATUS.json")  # a rename into place: read once, never half-written
    print(f"dropped {site / 'STATUS.json'}")


if __name__ == "__main__":
    main()

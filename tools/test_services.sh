#!/usr/bin/env bash
# What the test suite needs beside the virtualenv, started or installed when missing (idempotent):
# PostgreSQL on 127.0.0.1:5432 for the job-store conformance and scale-out tests, Debian's
# chromium (Playwright drives it; it never downloads a browser here) and firefox-esr (driven over
# WebDriver BiDi, tests/support/bidi.py) for tests/console.
set -euo pipefail
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi

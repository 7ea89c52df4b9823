#!/usr/bin/env bash
# CI: build the abi3 wheel and the sdist users get, install the wheel into a
# fresh virtual environment outside the checkout, and smoke-test it from
# outside the checkout, so that what runs is the wheel, never the source tree.
# The venv sees the system site-packages only so that torch is not downloaded
# twice; depprune itself must come from the wheel (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$(pwd -P)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
start_all=$SECONDS

work="$(mktemp -d "${TMPDIR:-/tmp}/depprune-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
case "$(cd "$work" && pwd -P)/" in
"$checkout"/*) echo "the wheel smoke test must run outside the checkout; set TMPDIR" >&2; exit 1 ;;
esac
mkdir "$work/dist" "$work/elsewhere"

mb() { python3 -c 'import os, sys; print(f"{os.path.getsize(sys.argv[1]) / 1e6:.2f} MB")' "$1"; }

echo "-- maturin build --release (the abi3 wheel)"
start=$SECONDS
maturin build --release --out "$work/dist"
build_s=$((SECONDS - start))
echo "-- maturin sdist"
maturin sdist --out "$work/dist"
shopt -s nullglob
wheels=("$work"/dist/depprune-*.whl)
sdists=("$work"/dist/depprune-*.tar.gz)
if [[ ${#wheels[@]} -ne 1 || ${#sdists[@]} -ne 1 ]]; then
    echo "expected one wheel and one sdist in $work/dist, found: $(ls "$work/dist")" >&2
    exit 1
fi
wheel="${wheels[0]}" sdist="${sdists[0]}"
[[ "$(basename "$wheel")" == *-abi3-* ]] || { echo "$(basename "$wheel") is not an abi3 wheel" >&2; exit 1; }
# The sdist must hold what a build from source needs: the Rust crates and the Python package.
listing="$(tar -tzf "$sdist")"
for member in pyproject.toml Cargo.toml Cargo.lock rust/depprune-core/Cargo.toml \
    rust/depprune-py/Cargo.toml rust/depprune-py/src/lib.rs python/depprune/__init__.py; do
    grep -qx "[^/]*/$member" <<<"$listing" || { echo "the sdist lacks $member" >&2; exit 1; }
done

echo "-- install the wheel into a venv outside the checkout"
python3 -m venv --system-site-packages "$work/venv"
py="$work/venv/bin/python"
# --force-reinstall --no-deps: the system may hold depprune already (CI installs the checkout);
# the venv must get its own copy from the wheel. The second install checks the wheel's
# dependencies resolve (from the system site-packages, so nothing is downloaded).
"$py" -m pip install -q --force-reinstall --no-deps "$wheel"
"$py" -m pip install -q "$wheel"

cd "$work/elsewhere"
venv_site="$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
for module in depprune depprune._core; do
    where="$("$py" -c "import $module; print($module.__file__)")"
    case "$where" in
    "$venv_site"/*) echo "$module from $where" ;;
    *) echo "$module was imported from $where, not from the wheel in $venv_site" >&2; exit 1 ;;
    esac
done
"$py" -c 'import depprune; print("depprune", depprune.__version__)'

echo "-- the built-in example, from the wheel"
start=$SECONDS
"$py" -m depprune.demo
demo_s=$((SECONDS - start))

echo "-- the depprune command: prune a small checkpoint from files, as a user would"
[[ -x "$work/venv/bin/depprune" ]] || { echo "the wheel installed no depprune command" >&2; exit 1; }
cli="$(PATH="$work/venv/bin:$PATH" command -v depprune)"
[[ "$cli" == "$work/venv/bin/depprune" ]] || { echo "depprune resolves to $cli" >&2; exit 1; }
"$cli" --version
"$cli" --help >/dev/null
"$py" - "$work/llama" <<'PY'
import sys, torch, transformers
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
PY
"$cli" inspect "$work/llama" --html "$work/graph.html" >/dev/null
"$cli" prune "$work/llama" -o "$work/pruned" --ratio 0.5 --save-plan "$work/plan.npz" -q
"$cli" inspect "$work/plan.npz" >/dev/null
"$py" - "$work/llama" "$work/pruned" "$work/plan.npz" <<'PY'
import sys, torch, transformers, depprune
source, pruned, plan = sys.argv[1:]
model = transformers.LlamaForCausalLM.from_pretrained(source).eval()
depprune.Plan.load(plan).apply(model)
reloaded = transformers.LlamaForCausalLM.from_pretrained(pruned).eval()
tokens = torch.tensor([[1, 2, 3, 4, 5]])
with torch.no_grad():
    assert torch.equal(model(tokens).logits, reloaded(tokens).logits), "streamed != in memory"
print("depprune prune from the wheel: the checkpoint reloads with the in-memory prune's logits")
PY
# An error is one line and a nonzero exit code, not a traceback.
if "$cli" apply "$work/llama" "$work/missing.npz" -o "$work/x" 2>"$work/err"; then
    echo "a missing plan file did not fail" >&2; exit 1
fi
[[ $(wc -l <"$work/err") -eq 1 ]] && ! grep -q Traceback "$work/err" || { cat "$work/err" >&2; exit 1; }

echo "-- sizes and times"
echo "wheel  $(basename "$wheel"): $(mb "$wheel")"
echo "sdist  $(basename "$sdist"): $(mb "$sdist")"
echo "release build ${build_s} s, demo ${demo_s} s, wheel smoke test in all $((SECONDS - start_all)) s"

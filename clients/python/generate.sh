#!/usr/bin/env bash
# Generates the Python protobuf and gRPC modules for the Tagward wire API
# from ../../proto into ./tagward_pb (gitignored). Uses the protoc bundled
# with grpcio-tools (python3 -m grpc_tools.protoc); no system protoc needed.
# Idempotent: the output folder is rebuilt from scratch on every run.
#
#   PYTHON=path/to/python3 bash generate.sh     (default: python3 on PATH)
#
# Import the result with tagward_pb on sys.path (tagward_client.py does):
#   from tagward.v1 import tagward_pb2, tagward_pb2_grpc
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="$here/tagward_pb"
py="${PYTHON:-python3}"

tmp="$(mktemp -d "$here/.tagward_pb.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # mktemp -d makes it 0700

# Every .proto under proto/, relative to the include root.
mapfile -t protos < <(cd "$proto_root" && find . -name '*.proto' | sed 's|^\./||' | sort)
if [ "${#protos[@]}" -eq 0 ]; then
  echo "generate.sh: no .proto files under $proto_root" >&2
  exit 1
fi

"$py" -m grpc_tools.protoc \
  --proto_path="$proto_root" \
  --python_out="$tmp" \
  --pyi_out="$tmp" \
  --grpc_python_out="$tmp" \
  "${protos[@]}"

# Regular packages (not namespace packages), so the modules import the same
# way everywhere.
find "$tmp" -mindepth 1 -type d -exec touch {}/__init__.py \;

rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "generated ${#protos[@]} proto file(s) into ${out#"$here"/}/"

#!/usr/bin/env bash
# At most 8 files come back from $OUT: keep the big weight shards as they are (>= 10 MiB each) and bundle
# everything else (logs, metrics, benchmark JSON, small weights, last shards) into $OUT/bundle.tar.
set -uo pipefail
OUT=${OUT:-out/device}
cd "$OUT" || exit 1
small=$(find . -maxdepth 1 -type f ! -name bundle.tar -size -10M -printf '%P ')
[ -n "$small" ] && tar -cf bundle.tar $small && rm -f $small
ls -la

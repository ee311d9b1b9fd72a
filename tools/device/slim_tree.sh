#!/usr/bin/env bash
# The working tree a GPU call sends must stay within 64 MiB (tracked files, untracked files git does not ignore, and
# the call's carried paths); the shipped DiT and VAE shards alone are ~114 MiB. `on` takes the sharded weights and the
# docs' pictures (a GPU machine reads neither from the tree) out of the index and ignores them: the files stay on
# disk, nothing here stops working. `off` puts back exactly the index entries it took out and removes its ignore
# lines; `status` says which state the checkout is in and how much a call would send.
#
#   bash tools/device/slim_tree.sh status [CARRY...]   # on/off, the weights taken out, MiB that travel (with CARRY)
#   bash tools/device/slim_tree.sh check CARRY...      # would a call carrying these fit once the tree is slim
#   bash tools/device/slim_tree.sh on                  # before the GPU calls
#   bash tools/device/slim_tree.sh off                 # right after them
#
# `on` refuses while the index holds staged changes (they would become part of the same state); `off` restores the
# recorded entries (mode, blob) whatever else is staged (an entry tracked again meanwhile is left as it is, named).
# While it is on, the index holds the shards' deletions: commit only with paths (`git commit -m ... -- PATHS`), which
# leaves them out; a commit without paths would record the deletions. SLIM_PATTERN (git pathspecs; default: the
# sharded safetensors files under talkstream/weights and the pictures and videos under docs/) picks the files.
set -euo pipefail
mode=${1:-status}; shift || true
cd "$(git rev-parse --show-toplevel)"
set -f  # (the patterns are git's pathspecs, not the shell's globs)
# shellcheck disable=SC2206
PATTERNS=(${SLIM_PATTERN:-talkstream/weights/*-of-*.safetensors docs/*.png docs/*.mp4 docs/*.gif})
set +f
STATE=$(git rev-parse --git-path slim_tree.state)
EXCLUDE=$(git rev-parse --git-path info/exclude)
BEGIN="# slim_tree.sh on: files out of the index while GPU calls run (bash tools/device/slim_tree.sh off)"
END="# slim_tree.sh end"
LIMIT=$((64 * 1024 * 1024))

git_index() {  # git that writes the index: waits for another process's index.lock (up to 60 s)
  local lock i
  lock=$(git rev-parse --git-path index.lock)
  for i in $(seq 60); do [ -e "$lock" ] || break; sleep 1; done
  git "$@"
}

travel_bytes() {  # what a call sends: tracked + untracked-not-ignored files (+ shared/) + the carried paths
  local total=0 n
  n=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
  total=$((total + n))
  for p in "$@"; do
    [ -e "$p" ] || { echo "carry: $p does not exist" >&2; return 2; }
    n=$(du -sb -- "$p" | cut -f1); total=$((total + n))
  done
  echo "$total"
}

slim_bytes() {  # the bytes `on` takes out of what travels (0 while it is on)
  [ -f "$STATE" ] && { echo 0; return; }
  git ls-files -z -- "${PATTERNS[@]}" | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

status() {
  if [ -f "$STATE" ]; then
    echo "slim tree: on ($(wc -l < "$STATE") files out of the index)"
  else
    echo "slim tree: off"
  fi
  local bytes
  bytes=$(travel_bytes "$@") || return 2
  awk -v b="$bytes" -v l="$LIMIT" -v c="$*" 'BEGIN {
    printf "a call sends %.1f MiB of 64 (the tree%s)\n", b / 1048576, (c == "" ? "" : " + carry " c) }'
  if [ "$bytes" -gt "$LIMIT" ]; then echo "over the 64 MiB limit"; return 3; fi
}

case $mode in
status)
  status "$@" ;;
check)  # CARRY...: would a call carrying these fit, with the tree slim? (exit 3 if not)
  bytes=$(travel_bytes "$@") || exit 2
  bytes=$((bytes - $(slim_bytes)))
  awk -v b="$bytes" -v c="$*" 'BEGIN { printf "slim tree + carry %s: %.1f MiB of 64\n", c, b / 1048576 }'
  [ "$bytes" -le "$LIMIT" ] || { echo "over the 64 MiB limit"; exit 3; } ;;
on)
  if [ -f "$STATE" ]; then echo "already on"; status || true; exit 0; fi
  if ! git diff --cached --quiet; then
    echo "refused: the index holds staged changes (commit or unstage them first):" >&2
    git diff --cached --name-status | sed 's/^/  /' >&2
    exit 1
  fi
  entries=$(git ls-files -s -- "${PATTERNS[@]}")
  [ -n "$entries" ] || { echo "no tracked file matches ${PATTERNS[*]}" >&2; exit 1; }
  printf '%s\n' "$entries" > "$STATE.tmp" && mv "$STATE.tmp" "$STATE"  # (recorded first: off can always undo)
  mapfile -t paths < <(printf '%s\n' "$entries" | cut -f2-)
  mkdir -p "$(dirname "$EXCLUDE")"
  [ ! -s "$EXCLUDE" ] || [ -z "$(tail -c 1 "$EXCLUDE")" ] || echo >> "$EXCLUDE"  # (a last line without its newline)
  { echo "$BEGIN"; printf '/%s\n' "${paths[@]}"; echo "$END"; } >> "$EXCLUDE"
  git_index rm --cached -q -- "${paths[@]}"
  status || true ;;
off)
  if [ ! -f "$STATE" ]; then echo "already off"; exit 0; fi
  args=() kept=()
  while IFS=$'\t' read -r meta path; do
    now=$(git ls-files -s -- ":(literal)$path")
    if [ -z "$now" ]; then
      read -r m sha _ <<< "$meta"
      args+=(--cacheinfo "$m,$sha,$path")
    elif [ "$now" != "$meta"$'\t'"$path" ]; then
      kept+=("$path")  # tracked again meanwhile with other contents (someone's commit): left as it is
    fi
  done < "$STATE"
  [ ${#args[@]} -eq 0 ] || git_index update-index --add "${args[@]}"
  if [ -f "$EXCLUDE" ]; then  # our block only: other lines stay as they are
    awk -v b="$BEGIN" -v e="$END" '$0 == b {skip = 1; next} skip && $0 == e {skip = 0; next} !skip' "$EXCLUDE" \
      > "$EXCLUDE.tmp" && mv "$EXCLUDE.tmp" "$EXCLUDE"
  fi
  gone=$(cut -f2- "$STATE" | while read -r p; do git cat-file -e "HEAD:$p" 2>/dev/null || echo "$p"; done)
  rm -f "$STATE"
  [ ${#kept[@]} -eq 0 ] || echo "warning: tracked again with other contents while slim, left as they are: ${kept[*]}"
  [ -z "$gone" ] || echo "warning: a commit made while the tree was slim deleted these from HEAD (now staged again): $gone"
  status || true ;;
*)
  echo "usage: $0 on | off | status [CARRY...] | check CARRY..." >&2; exit 2 ;;
esac

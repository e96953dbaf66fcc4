# Sourced by the launch scripts, not run: printing commands so that they paste back unchanged, and the dry run.
# shellcheck shell=bash

# Prints its arguments as one bash command line: words of plain characters stay bare, every other word is put in
# single quotes (each ' written as '\''), which bash, sh and zsh all read back as the same word.
quote() {
  local a words=()
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./=:,@%+-]* ]]; then
      words+=("$a")
    else
      words+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

# Runs a command, or with DRY_RUN set to anything but 0 prints it instead.
run() {
  if [[ ${DRY_RUN:-0} != 0 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

# Sets the array batch_flags to the per-device batch settings a multi-process job starts with: one crop and one tile
# per device, so that the global batches (x the job's device count) split evenly over its processes at any scale.
# A batch the given program flags already choose (--config.train.batch_size=N, ..._per_device=N, either section)
# is left to them.
per_device_batches() {
  local section a given
  batch_flags=()
  for section in train predict; do
    given=0
    for a in "$@"; do
      if [[ $a =~ ^--?config\.$section\.batch_size(_per_device)?(=|$) ]]; then
        given=1
      fi
    done
    if ((!given)); then
      batch_flags+=("--config.$section.batch_size_per_device=1")
    fi
  done
}

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

# Shared by deploy/lab and deploy/topology-test (sourced, not run).
#
# The container lab is the compose project ${FBL_PROJECT:-failback-lab} of the compose file in
# ${FBL_COMPOSE_DIR:-deploy} (deploy/compose.yaml, the rendering of the default topology, or
# what `srctl lab render -t FILE --out DIR` wrote); containers are named fbl-NAME after the
# lab's component names (fbl-cs, fbl-vpn, fbl-ps-azure, ...), networks fbl-onprem and
# fbl-azure. The rendering's services.env names the components (FBL_EXPECTED, FBL_AZURE_PS...).

deploy=${deploy:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
root=$(dirname "$deploy")
FBL_PROJECT=${FBL_PROJECT:-failback-lab}
FBL_COMPOSE_DIR=${FBL_COMPOSE_DIR:-$deploy}
# shellcheck source=deploy/services.env
source "$FBL_COMPOSE_DIR/services.env"
FBL_NET_PREFIX=${FBL_NET_PREFIX:-10.213}
FBL_CS_ENROLL_PORT=${FBL_CS_ENROLL_PORT:-17001}
FBL_CS_API_PORT=${FBL_CS_API_PORT:-17002}
FBL_LINK_CONTROL_PORT=${FBL_LINK_CONTROL_PORT:-17000}
export FBL_NET_PREFIX FBL_CS_ENROLL_PORT FBL_CS_API_PORT FBL_LINK_CONTROL_PORT
SRCTL=${FBL_SRCTL:-${CARGO_TARGET_DIR:-$root/target}/${FBL_PROFILE:-release}/srctl}


say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { say "$*"; exit 1; }

# `docker compose` (v2) if present, else docker-compose (v1); same file, same project.
compose() {
    if [[ -z "${_fbl_compose:-}" ]]; then
        if docker compose version >/dev/null 2>&1; then
            _fbl_compose="docker compose"
        elif command -v docker-compose >/dev/null 2>&1; then
            _fbl_compose="docker-compose"
        else
            die "neither \`docker compose\` nor docker-compose is installed"
        fi
    fi
    $_fbl_compose -p "$FBL_PROJECT" -f "$FBL_COMPOSE_DIR/compose.yaml" "$@"
}

srctl() { "$SRCTL" --lab "$FBL_LAB_DIR" "$@"; }

# The container of component $1 (deploy/swarm overrides it: Swarm names tasks itself).
container() { echo "fbl-$1"; }

# Writes the directory srctl uses for the running container lab (what `srctl lab up` writes
# for a local one): lab.json with the published addresses of the CS and of vpn-link's control
# API, the CA certificate in data/cs/, and (first time only) the operator's credentials in
# DIR/operator/identity/, issued inside fbl-cs by `config-server operator add` as on any CS
# host: the component passphrase never leaves the CS and enrolls no operator.
write_lab_dir() {
    local dir=$1
    mkdir -p "$dir/data/cs"
    dir=$(cd "$dir" && pwd)
    local tmp
    tmp=$(mktemp -d)
    local cs
    cs=$(container "$FBL_CS")
    docker cp "$cs:/data/ca.pem" "$tmp/ca.pem" >/dev/null
    if ! cmp -s "$tmp/ca.pem" "$dir/data/cs/ca.pem" 2>/dev/null; then
        # Another lab's operator certificate is worthless against this CA.
        rm -rf "$dir/operator"
    fi
    cp "$tmp/ca.pem" "$dir/data/cs/ca.pem"
    rm -rf "$tmp"
    if [[ ! -f "$dir/operator/identity/cert.pem" ]]; then
        # A name of its own per lab directory: a removed directory's operator stays revocable.
        local name
        name="srctl-$(date +%s)-$$"
        docker exec "$cs" config-server operator add "$name" \
            --out "/data/operators/$name" --config "/config/$FBL_CS.toml" >/dev/null
        rm -rf "$dir/operator"
        mkdir -p "$dir/operator"
        chmod 700 "$dir/operator"
        docker cp "$cs:/data/operators/$name/identity" "$dir/operator/identity" >/dev/null
        chmod 700 "$dir/operator/identity"
        chmod 600 "$dir/operator/identity/key.pem"
    fi
    local expected
    expected=$(printf '"%s",' "${FBL_EXPECTED[@]}")
    cat >"$dir/lab.json.tmp" <<EOF
{
  "dir": "$dir",
  "cs_api": "127.0.0.1:$FBL_CS_API_PORT",
  "cs_enroll": "127.0.0.1:$FBL_CS_ENROLL_PORT",
  "link_control": "127.0.0.1:$FBL_LINK_CONTROL_PORT",
  "link_name": "vpn",
  "expected": [${expected%,}],
  "procs": [],
  "containers": "${FBL_CONTAINERS:-compose project $FBL_PROJECT of $FBL_COMPOSE_DIR/compose.yaml: deploy/lab ps|logs|down}",
  "start_command": "${FBL_START_COMMAND:-deploy/lab add}"
}
EOF
    mv "$dir/lab.json.tmp" "$dir/lab.json"
}

# Waits until every component and machine is connected (srctl infra list), up to $1 seconds.
wait_connected() {
    local within=${1:-120} deadline missing rows
    deadline=$(($(date +%s) + within))
    while :; do
        missing=()
        if rows=$(srctl infra list --json 2>/dev/null); then
            for n in "${FBL_EXPECTED[@]}"; do
                jq -e --arg n "$n" 'any(.[]; .name == $n and .status == "connected")' \
                    <<<"$rows" >/dev/null || missing+=("$n")
            done
            [[ ${#missing[@]} -eq 0 ]] && return 0
        else
            missing=(the configuration server)
        fi
        if (($(date +%s) > deadline)); then
            say "timed out after ${within}s waiting for ${missing[*]} to be connected"
            srctl infra list >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# Up: start the containers (compose waits for the CS, the trust bootstrap, vpn-link and each
# component's healthcheck order), write the srctl directory, wait for registration.
lab_up() {
    local dir=$1
    docker image inspect "${FBL_IMAGE:-failback-lab:latest}" >/dev/null 2>&1 ||
        die "no image ${FBL_IMAGE:-failback-lab:latest}: run deploy/build-images first"
    [[ -x "$SRCTL" ]] || die "$SRCTL missing: cargo build (FBL_PROFILE=${FBL_PROFILE:-release}) or set FBL_SRCTL"
    compose up -d
    write_lab_dir "$dir"
    FBL_LAB_DIR=$(cd "$dir" && pwd)
    wait_connected 120
}

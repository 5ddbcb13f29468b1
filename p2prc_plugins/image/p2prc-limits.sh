# p2prc: what pip installs for root is on the PATH, and an interactive login says this
# container's limits. nproc honours them already (OMP_NUM_THREADS, set by the host); free
# and /proc/meminfo show the host's whole machine.
case ":$PATH:" in *:/root/.local/bin:*) ;; *) PATH="/root/.local/bin:$PATH" ;; esac
case "$-" in *i*) ;; *) return 0 2>/dev/null || exit 0 ;; esac
if [ -n "${P2PRC_CPUS:-}" ] && [ -n "${P2PRC_MEMORY:-}" ]; then
  echo "p2prc: this container may use ${P2PRC_CPUS} CPU(s) and $((P2PRC_MEMORY / 1048576)) MiB" \
       "of memory (P2PRC_CPUS, P2PRC_MEMORY); nproc says ${OMP_NUM_THREADS:-?}." \
       "free and top show the host's whole machine."
fi

"""`python -m jtransfer`: see `jtransfer.cli`."""

# The guard matters: data-loading workers start with `spawn`, which re-imports this module.
if __name__ == "__main__":
    from jtransfer import hostmem

    # Huge pages for XLA's per-step buffers; restarts the process once (jtransfer.hostmem).
    hostmem.reexec_with_hugepages()

    from jtransfer.cli import main

    raise SystemExit(main())

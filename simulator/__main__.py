"""``python -m hybrid_router.simulator --host H --port P [--ttft-s ...]``."""

from hybrid_router.simulator.cli import main

if __name__ == "__main__":
    main()

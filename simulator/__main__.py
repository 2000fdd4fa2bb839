"""``python -m simulator --host H --port P [--ttft-s ...]``."""

from simulator.cli import main

if __name__ == "__main__":
    main()

"""`python -m lrft ...`, the entry point `accelerate launch -m lrft` uses."""

from lrft.cli import main

if __name__ == "__main__":
    main()

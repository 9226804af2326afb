"""``python -m grpo``: the CLI, for launchers that take a module (``torchrun -m grpo train …``)."""

from grpo.cli.main import main

if __name__ == "__main__":
    main()

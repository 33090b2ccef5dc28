"""``python -m crossret ...`` is ``crossret ...`` (also what ``torchrun -m crossret`` runs on every rank)."""

from crossret.cli import main

if __name__ == "__main__":
    main()

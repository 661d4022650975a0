from tessera.cli import main

# NOTE: guarded: the server spawns its engine process, and spawn re-imports the parent's main module
if __name__ == "__main__":
    raise SystemExit(main())

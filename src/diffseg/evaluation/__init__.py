"""The evaluation harness: benchmark layouts and label maps (`datasets`), Hungarian-matched scores (`metrics`), the
resumable run (`harness`)."""

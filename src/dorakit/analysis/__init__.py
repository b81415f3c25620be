"""The paper's weight-decomposition analysis (ΔM, ΔD), its report, and `dorakit compare`."""

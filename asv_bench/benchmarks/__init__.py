"""asv benchmarks: one cell per registered backend x shape x dtype x mode; cells that cannot
run here raise NotImplementedError in ``setup`` (asv then skips them)."""

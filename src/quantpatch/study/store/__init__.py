"""Where a study keeps what it has computed: the artifact cache and the run folder."""

"""Job kinds: what each request kind runs, in which lane, and how an interrupted run is recovered."""

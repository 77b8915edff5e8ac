"""The teaching parts of the notebooks, one module per lesson or concept; this package itself holds none of them.

- widgets: "What you should have seen" lines, collapsed answers, live views (ipywidgets), sliders
- orientation: the pipeline diagram at the top of each lesson; quiet: library noise off
- derivations: whether a trace's steps are right, not only its answer (lucky traces)
- base_model (00), sampling (01), selection (02), refinement (03), training (04), evaluation (05), tldr (07): the
  summary lines, worked examples and small computations each lesson checks its inline re-implementations against
- claims, plotting, palette, book: sentences chosen by the run's numbers, figures, colours, the static book
"""

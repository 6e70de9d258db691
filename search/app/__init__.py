"""The application over the search core: the command line and its use cases (commands, reports,
progress, the dashboard, experiment tracking, merge files). The core (``evomerge.search``)
imports nothing from here; what it reports reaches this layer through the observers the
commands give the controller (:mod:`evomerge.search.observers`)."""

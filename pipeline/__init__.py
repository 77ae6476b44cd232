"""Stage two of taps and the user surface: classifiers, protocols, evaluation, comparison, CLI."""

"""The model zoo's builders, above the engine: fine-tune a classifier, train a language model's
trajectory, and build an entry into its folder with a manifest. What the zoo holds and where a
built entry lives is the engine's `catalogue`; loading a zoo model never imports this floor."""

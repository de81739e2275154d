# Stand-in: the sdist lacks tests/generation/; a vision encoder cannot `generate`, so no NEPA tester inherits this.
class GenerationTesterMixin:
    pass

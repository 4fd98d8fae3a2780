"""Global Value Model maths: TD(lambda) targets, the GVM loss and pairwise-accuracy metrics."""

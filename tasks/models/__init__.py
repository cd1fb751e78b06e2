"""Networks (MONAI CNNs, the slice RNN, the SVM baseline), their augmentation and the fitting loops."""

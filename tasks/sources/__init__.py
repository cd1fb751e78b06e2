"""Where images come from: records, a DICOM folder, a MedMNIST .npz, the label table and the patient split."""

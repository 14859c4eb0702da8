"""The files of a DECA data folder, as DECA's README names them, and where users get them."""

FLAME_SITE = "https://flame.is.tue.mpg.de (register, download FLAME 2020)"
DECA_SITE = "DECA's README (github.com/yfeng95/DECA): fetch_data.sh or its Google Drive link"
DECA_REPO_DATA = "the data/ folder of DECA's repository (github.com/yfeng95/DECA)"

# name -> (what it is, where users get it, required)
DECA_FILES = {
    "generic_model.pkl": ("FLAME 2020 model (pickle, chumpy + scipy sparse)", FLAME_SITE, True),
    "deca_model.tar": ("DECA encoder/decoder weights (torch dict)", DECA_SITE, True),
    "landmark_embedding.npy": ("FLAME landmark embedding (pickled dict)", DECA_REPO_DATA, True),
    "head_template.obj": ("FLAME topology with UVs", DECA_REPO_DATA, True),
    "uv_face_mask.png": ("UV face mask", DECA_REPO_DATA, False),
    "uv_face_eye_mask.png": ("UV face+eye mask", DECA_REPO_DATA, False),
    "mean_texture.jpg": ("mean UV texture", DECA_REPO_DATA, False),
    "fixed_displacement_256.npy": ("fixed UV displacement", DECA_REPO_DATA, False),
    "FLAME_texture.npz": (
        "FLAME albedo space (mean, tex_dir)",
        "https://flame.is.tue.mpg.de (FLAME texture space)",
        False,
    ),
    "FLAME_albedo_from_BFM.npz": (
        "BFM-converted albedo space (MU, PC)",
        "github.com/TimoBolkart/BFM_to_FLAME (convert it yourself: BFM licence)",
        False,
    ),
}
TEXTURE_FILES = ("FLAME_texture.npz", "FLAME_albedo_from_BFM.npz")
